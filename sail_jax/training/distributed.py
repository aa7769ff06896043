"""Multi-host setup: `jax.distributed.initialize` from flags or the environment, and cross-host agreement.

Flags win over the environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`.
With none of them set, `auto=True` lets JAX detect the cluster (TPU pods, SLURM, ...); otherwise the run is
single-process. On CPU, cross-process collectives use gloo (JAX's default CPU implementation).
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np


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


class PreemptionFlag:
    """Set by SIGTERM (the signal pods get before preemption); the trainer checkpoints at the next step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
