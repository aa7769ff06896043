"""Test setup: 8 fake CPU devices (set before jax initialises) and shared paths."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS emulator with the bucket `gcs_emulator.BUCKET` for the module's tests, every client pointed at it and
    a fresh local cache for copies of gs:// inputs; yields that environment."""
    from tests.gcs_emulator import BUCKET, environment, gcs_emulator

    cache = {"SAIL_JAX_CACHE": str(tmp_path_factory.mktemp("cache"))}
    with gcs_emulator(BUCKET, tmp_path_factory.mktemp("gcs") / "emulator.log") as env, environment({**env, **cache}):
        yield {**env, **cache}
