"""`sail-jax` command line: one module per sub-command, each exposing `register(subparsers)`.

Sub-command modules are discovered in this package, so adding a command never edits a shared file.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

from sail_jax import host_malloc


def shows_default(action: argparse.Action) -> bool:
    """Whether `--help` lists this option's default: one worth showing (not None, False or empty)."""
    default = action.default
    if default is argparse.SUPPRESS or default is None or default is False:
        return False
    if isinstance(default, list | tuple) and not default:
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written (command docstrings carry example command lines); defaults listed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if shows_default(action) and "%(default)" not in text:
            return f"{text} (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """The parser of `sail-jax` and of every sub-command under it (sub-parsers inherit the class): one help format
    for all, whatever formatter a command asks for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.help is None and shows_default(action):
            action.help = "(default: %(default)s)"  # argparse prints nothing, not even the default, without help
        return action

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """Also records the innermost (sub-)parser that parsed the line, so errors found later print its usage."""
        parsed, extra = super().parse_known_args(args, namespace)
        if not hasattr(parsed, "command_parser"):
            parsed.command_parser = self
        return parsed, extra


def version() -> str:
    """The installed distribution's version (package metadata)."""
    try:
        return importlib.metadata.version("sail-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (sail-jax is not installed: no package metadata)"


def build_parser() -> Parser:
    parser = Parser(prog="sail-jax", description="SAIL-VL2 in JAX: train, convert, run.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
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
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
