"""glibc malloc settings for runs on the XLA:CPU backend.

Why: XLA:CPU takes every output and temporary buffer from malloc and frees it after the step. glibc serves blocks
over 32 MB with a fresh `mmap` and unmaps them on free, so each step page-faults all its large buffers again: on
the 2-core CI VM the train step of `benchmarks/train_step.py` faults 1.6 GB per step. Keeping freed memory in one
heap (`mmap_max=0`, a huge `trim_threshold`, one arena) and backing it with transparent huge pages (`hugetlb=1`)
lets the next step reuse warm pages. glibc reads these tunables only at
process start, so the CLI re-executes itself once with `GLIBC_TUNABLES` set (same PID, same arguments).

Applied only on glibc Linux without a GPU/TPU device file (host memory on accelerator hosts is left alone), and
never over a tunable the user set. `SAIL_JAX_MALLOC_TUNING=0` turns it off, `=1` forces it on.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

TUNABLES = (
    ("glibc.malloc.hugetlb", "1"),  # madvise(MADV_HUGEPAGE) on the heap: 512x fewer first-touch faults
    ("glibc.malloc.mmap_max", "0"),  # large blocks from the heap, not from a fresh mmap per allocation
    ("glibc.malloc.trim_threshold", str(1 << 40)),  # never hand freed heap pages back to the kernel
    ("glibc.malloc.arena_max", "1"),  # one heap, so a block freed by one thread is reused by the next step
)
SWITCH = "SAIL_JAX_MALLOC_TUNING"
_APPLIED = "SAIL_JAX_MALLOC_TUNED"  # set in the re-executed process, so it never loops
_ACCELERATOR_FILES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def tuned_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with our malloc tunables merged into `GLIBC_TUNABLES`; tunables already set there are kept."""
    out = dict(env)
    current = [t for t in out.get("GLIBC_TUNABLES", "").split(":") if t]
    have = {t.split("=", 1)[0] for t in current}
    out["GLIBC_TUNABLES"] = ":".join(current + [f"{k}={v}" for k, v in TUNABLES if k not in have])
    out[_APPLIED] = "1"
    return out


def wanted(env: Mapping[str, str]) -> bool:
    """Whether this process should run with the tunables (see the module docstring for the rule)."""
    switch = env.get(SWITCH, "").strip().lower()
    if switch in ("0", "false", "no", "off") or env.get(_APPLIED):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if switch in ("1", "true", "yes", "on"):
        return True
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


def reexec_command(argv: Sequence[str]) -> list[str]:
    """The command line that re-runs `sail-jax ARGV` with the package that is running now.

    Not `python -m sail_jax`: that puts the working directory first on sys.path, so started from another checkout it
    would run that checkout's code. `-P` leaves the working directory out; when the package Python then finds is
    not this one, the directory this package was imported from (with `converters` and `pallas_kernels` beside it)
    goes first. An installed or editable package is found as it was, with no checkout folder added to sys.path
    (which would make `configs/` importable and confuse gin's file lookup).
    """
    root = str(Path(__file__).resolve().parents[1])
    boot = ("import importlib.util, os, sys\n"
            f"root = {root!r}\n"
            "spec = importlib.util.find_spec('sail_jax')\n"
            "found = spec and spec.origin and os.path.dirname(os.path.dirname(os.path.realpath(spec.origin)))\n"
            "if found != root: sys.path.insert(0, root)\n"
            "from sail_jax.cli import main; sys.exit(main())")
    return [sys.executable, "-P", "-c", boot, *argv]


def reexec_if_wanted(argv: Sequence[str]) -> None:
    """Replace this process by `reexec_command(ARGV)` with the tunables, when `wanted`; else return."""
    if not wanted(os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    command = reexec_command(argv)
    os.execve(command[0], command, tuned_env(os.environ))
