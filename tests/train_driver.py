"""Runs `sail-jax train` with an extra gin data factory whose batches arrive slowly, so a test can signal the
process between steps (SIGKILL, SIGTERM) deterministically enough. Usage: python tests/train_driver.py ARGS."""

from __future__ import annotations

import sys
import time

import gin

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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
