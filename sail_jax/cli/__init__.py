"""`sail-jax` command line: one module per sub-command, each exposing `register(subparsers)`.

Sub-command modules are discovered in this package, so adding a command never edits a shared file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from sail_jax import host_malloc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sail-jax", description="SAIL-VL2 in JAX: train, convert, run.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a real command line (not a call from Python): tune glibc malloc for XLA:CPU first
        host_malloc.reexec_if_wanted(sys.argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Sub-commands configured with gin also take t5x-style `--gin.NAME=VALUE` flags.
    if extra and not (getattr(args, "accepts_gin_flags", False) and all(a.startswith("--gin.") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.gin_flags = extra
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError) as e:
        # User errors (bad paths, bad configs, bad inputs) get one clear line, not a traceback.
        print(f"sail-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
