"""A run whose WORKDIR is a `gs://` URL, for real, against a local GCS emulator (tests/gcs_emulator.py): train,
SIGKILL after a checkpoint, resume to the end, convert the workdir's checkpoint to an upstream directory on
`gs://`, read the metrics back, run `info` / `generate` from the bucket. Marked `gcs` (deselect with `-m "not gcs"`)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from sail_jax.cli import main
from sail_jax.files import as_path
from tests.gcs_emulator import environment, gcs_emulator
from tests.trainer_utils import REPO, TINY_GIN

pytestmark = pytest.mark.gcs
DRIVER = str(REPO / "tests" / "train_driver.py")
BUCKET = "sail-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with gcs_emulator(BUCKET, tmp_path_factory.mktemp("gcs") / "emulator.log") as env, environment(env):
        yield env


def start(workdir: str, env: dict[str, str], log, *extra: str) -> subprocess.Popen:
    e = {**os.environ, **env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
    args = [sys.executable, DRIVER, "train", f"--gin_file={TINY_GIN}", f"--gin.WORKDIR='{workdir}'",
            "--gin.train.steps=3", "--gin.DATA=@slow_synthetic_data", "--gin.slow_synthetic_data.delay_s=0.5",
            f"--gin.train.tokenizer_dir='{REPO / 'assets' / 'tokenizer'}'", *extra]
    with log.open("w") as f:
        return subprocess.Popen(args, env=e, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


def test_train_kill_resume_convert_on_gcs(gcs, tmp_path, capsys):
    workdir = f"gs://{BUCKET}/run"
    first = as_path(workdir) / "checkpoints" / "1" / "commit_success.txt"  # Orbax's commit marker on object stores
    proc = start(workdir, gcs, tmp_path / "first.log")
    t0 = time.monotonic()
    while not first.exists():
        assert proc.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() - t0 < 300, "timed out waiting for the first checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

    proc = start(workdir, gcs, tmp_path / "resume.log", "--resume")
    assert proc.wait(timeout=600) == 0, (tmp_path / "resume.log").read_text()
    log = (tmp_path / "resume.log").read_text()
    assert "steps 1..3" in log or "steps 2..3" in log, log

    run = as_path(workdir)
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    assert json.loads((run / "checkpoints" / "3" / "train_state" / "metadata").read_text())["step"] == 3
    assert "train.steps = 3" in (run / "config.gin").read_text()
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())

    # the workdir stands for its newest step; the upstream directory is written to gs:// too
    assert main(["convert", "orbax-to-hf", "--src", workdir, "--dst", f"gs://{BUCKET}/hf", "--no-progress"]) == 0
    hf = as_path(f"gs://{BUCKET}/hf")
    assert json.loads((hf / "config.json").read_text())["llm_config"]["vocab_size"] == 512
    assert (hf / "model.safetensors").exists()
    assert (hf / "vocab.json").read_bytes() == (REPO / "assets/tokenizer/vocab.json").read_bytes()

    # commands run from the gs:// workdir alone (the tokenizer it carries is fetched)
    assert main(["info", "--checkpoint", workdir]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {workdir}/checkpoints/3: sail-jax (Orbax)" in out
    assert f"tokenizer: {workdir}/checkpoints/3/tokenizer" in out
    assert main(["generate", "--checkpoint", workdir, "--prompt", "Hello", "--max-new-tokens", "2"]) == 0
    assert "2 tokens (length)" in capsys.readouterr().err
