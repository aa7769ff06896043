"""Multi-host setup: `jax.distributed.initialize` from flags or the environment, and cross-host agreement.

Flags win over the environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`.
With none of them set, `auto=True` lets JAX detect the cluster (TPU pods, SLURM, ...); otherwise the run is
single-process. On CPU, cross-process collectives use gloo (JAX's default CPU implementation).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from sail_jax.files import is_url


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> bool:
    """Start the distributed runtime when asked to; returns whether it was started. Call before any JAX op."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    explicit = (coordinator_address, num_processes, process_id)
    if all(v is None for v in explicit):
        if auto:
            jax.distributed.initialize()
            return True
        return False
    if any(v is None for v in explicit):
        raise ValueError(
            "multi-host needs all of --coordinator-address, --num-processes and --process-id (or the "
            f"JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables); got {explicit}"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a tiny all-gather; free on one process)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def barrier(name: str) -> None:
    """Wait until every process gets here (free on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def workdir_lock(workdir: str | Path) -> Iterator[None]:
    """Hold an exclusive `flock` on WORKDIR/.lock (process 0 only; re-entrant within the process), so a second
    run on the same workdir is refused in one line instead of interleaving its metrics and checkpoints.

    The kernel drops the lock when the process ends, however it ends. Filesystems without `flock` support (some
    FUSE mounts of object stores) are run unlocked with a warning, and so are object-store URLs (`gs://...`, no
    lock exists there): one workdir per run is up to the user.
    """
    if jax.process_index() != 0 or is_url(workdir):
        yield
        return
    path = Path(workdir).absolute() / ".lock"
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ValueError(f"workdir {path.parent} is in use by another run ({holder}; it holds {path}); wait "
                             f"for it to end or use another workdir") from None
        except OSError as e:
            print(f"warning: cannot lock {path} ({e.strerror}); running without a workdir lock", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        _HELD[path] = 1
        try:
            yield
        finally:
            del _HELD[path]
    finally:
        os.close(fd)  # releases the lock


_HELD: dict[Path, int] = {}


class PreemptionFlag:
    """Set by SIGTERM (the signal pods get before preemption); the trainer checkpoints at the next step.

    A second SIGTERM ends the process at once (the default action), so a run that cannot reach a step boundary
    is never left ignoring the signal."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
