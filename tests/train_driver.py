"""Runs `sail-jax train` with extra gin data factories: one whose batches arrive slowly, so a test can signal the
process between steps (SIGKILL, SIGTERM) deterministically enough, and one that logs which samples each batch
the trainer takes holds (`logged_data`). Usage: python tests/train_driver.py ARGS."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import gin
import numpy as np

from sail_jax.cli import main
from sail_jax.training import gin_setup  # noqa: F401  (registers train, model_config, ...)
from sail_jax.training.synthetic import synthetic_data


class SlowIterator:
    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay_s)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


@gin.configurable
def slow_synthetic_data(*, delay_s: float = 0.0, max_tiles: int = 2, **kwargs) -> SlowIterator:
    return SlowIterator(synthetic_data(max_tiles=max_tiles, **kwargs), delay_s)


def sample_ids(batch: dict[str, np.ndarray]) -> list[str]:
    """A content id of every sample of every row (the hash of its tokens and targets)."""
    ids = []
    for tokens, segments, mask in zip(batch["input_ids"], batch["segment_ids"], batch["loss_mask"]):
        for s in np.unique(segments[segments > 0]):
            at = segments == s
            ids.append(hashlib.sha1(tokens[at].tobytes() + mask[at].tobytes()).hexdigest()[:16])
    return ids


class LoggingIterator(SlowIterator):
    """Appends `{"batch": i, "samples": [...]}` to DIR/PID.jsonl for the i-th batch the trainer takes in this run
    (after `delay_s`)."""

    def __init__(self, inner, log_dir: str, delay_s: float):
        super().__init__(inner, delay_s)
        self.path, self.taken = Path(log_dir) / f"{os.getpid()}.jsonl", 0
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __next__(self):
        batch = super().__next__()
        with self.path.open("a") as f:
            f.write(json.dumps({"batch": self.taken, "samples": sample_ids(batch)}) + "\n")
        self.taken += 1
        return batch


@gin.configurable
def logged_data(*, factory, log_dir: str, delay_s: float = 0.0, **kwargs) -> LoggingIterator:
    """`factory` (e.g. `@grain_data`) whose batches are logged (`LoggingIterator`)."""
    return LoggingIterator(factory(**kwargs), log_dir, delay_s)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
