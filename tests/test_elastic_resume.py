"""Elastic resume through `sail-jax train` as separate processes (jax.distributed on localhost): a run stopped
(SIGTERM) on one process count and mesh and resumed on another takes exactly the samples of the uninterrupted run,
batch by batch, and reaches its losses and parameters (the parameters resharded onto the new mesh).

Each batch's samples are logged by tests/train_driver.py's `logged_data` (a content id per sample) as the trainer
takes them. Synthetic data 2 -> 1 processes; the Grain pipeline with 2 data shards 1 -> 2 processes.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sail_jax.config import IMG_CONTEXT_TOKEN_ID
from sail_jax.evaluation.demo import make_demo_data
from tests.test_train_processes import DRIVER, complete_steps, env, finish, logged_beyond, wait_for
from tests.trainer_utils import REPO, TINY_GIN, metrics

STEPS = 4
# Only the SIGTERM's step and the last one are checkpointed.
RUN = (f"--gin.train.steps={STEPS}", "--gin.CheckpointConfig.every_steps=100")
SYNTHETIC = ("--gin.logged_data.factory=@slow_synthetic_data", *RUN)


def grain(demo: Path) -> tuple[str, ...]:
    return ("--gin.logged_data.factory=@grain_data", f"--gin.grain_data.datasets=[{{'path': '{demo}/train.jsonl'}}]",
            f"--gin.grain_data.tokenizer_dir='{REPO / 'tests' / 'data' / 'tokenizer'}'",
            "--gin.grain_data.data_shards=2", "--gin.grain_data.max_tiles=2", "--gin.grain_data.max_num=1",
            "--gin.grain_data.num_workers=0", "--gin.train.seq_len=256",  # the tokenizer's vocabulary and ids:
            "--gin.LLMConfig.vocab_size=151936", f"--gin.ModelConfig.img_context_token_id={IMG_CONTEXT_TOKEN_ID}",
            "--gin.train.trainable=('adapter',)", *RUN)  # smaller steps and checkpoints


def launch(workdir: Path, cache: Path, log_dir: Path, data: tuple[str, ...], *extra: str, processes: int = 1,
           delay: float = 0.0) -> list:
    """`processes` processes of one run (4 CPU devices in all), each batch's samples logged under `log_dir`."""
    args = [sys.executable, DRIVER, "train", f"--gin_file={TINY_GIN}", f"--gin.WORKDIR='{workdir}'",
            "--gin.DATA=@logged_data", f"--gin.logged_data.log_dir='{log_dir}'",
            f"--gin.logged_data.delay_s={delay}", *data, *extra]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
    procs = []
    for i in range(processes):
        multi = [f"--coordinator-address=localhost:{port}", f"--num-processes={processes}",
                 f"--process-id={i}"] if processes > 1 else []
        log = workdir.parent / f"{workdir.name}-{time.monotonic_ns()}.log"
        with log.open("w") as f:
            proc = subprocess.Popen([*args, *multi], env=env(cache, 4 // processes), stdout=f,
                                    stderr=subprocess.STDOUT)
        proc.log_path = log
        procs.append(proc)
    return procs


def run(*args, **kwargs) -> None:
    for rc, log in [finish(p) for p in launch(*args, **kwargs)]:
        assert rc == 0, log


def stop_early(workdir: Path, procs: list) -> int:
    """SIGTERM every process once step 2 is logged; the step the run checkpointed (2 or 3)."""
    wait_for(lambda: logged_beyond(workdir, 1), procs[0])
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for rc, log in [finish(p) for p in procs]:
        assert rc >= 0 and "Traceback" not in log, log  # checkpointed and exited (not killed by the signal)
    stopped = complete_steps(workdir)[-1]
    assert 1 < stopped < STEPS
    return stopped


def batches(*log_dirs: Path) -> list[list[str]]:
    """The sorted sample ids of each global batch the trainer took, run after run (every process's rows)."""
    out = []
    for d in log_dirs:
        per_batch: dict[int, list[str]] = {}
        for f in d.glob("*.jsonl"):
            for line in f.read_text().splitlines():
                rec = json.loads(line)
                per_batch.setdefault(rec["batch"], []).extend(rec["samples"])
        out += [sorted(per_batch[i]) for i in range(len(per_batch))]
    return out


def load_params(workdir: Path, step: int):
    """A checkpoint's params on this process's first device, whatever processes and mesh wrote them."""
    d = (workdir / "checkpoints" / str(step) / "params").absolute()
    with ocp.StandardCheckpointer() as c:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                c.metadata(d).item_metadata)
        return jax.tree.map(np.asarray, c.restore(d, abstract))


def assert_same_run(w: Path, logs: tuple[Path, ...], reference: Path, ref_log: Path) -> None:
    got, want = batches(*logs), batches(ref_log)
    assert len(want) == STEPS and Counter(s for b in got for s in b) == Counter(s for b in want for s in b)
    assert got == want  # and even batch by batch
    np.testing.assert_allclose([r["loss"] for r in metrics(w)], [r["loss"] for r in metrics(reference)], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(load_params(w, STEPS)), jax.tree.leaves(load_params(reference, STEPS))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


def test_synthetic_run_resumes_from_two_processes_on_one_with_another_mesh(cache, tmp_path):
    ref, w = tmp_path / "reference", tmp_path / "elastic"
    run(ref, cache, tmp_path / "ref-log", SYNTHETIC)
    stop_early(w, launch(w, cache, tmp_path / "log-1", SYNTHETIC, processes=2, delay=0.5))
    run(w, cache, tmp_path / "log-2", SYNTHETIC, "--resume", "--gin.train.mesh={'fsdp': 2, 'tensor': 2}")
    assert_same_run(w, (tmp_path / "log-1", tmp_path / "log-2"), ref, tmp_path / "ref-log")


def test_grain_run_resumes_from_one_process_on_two_and_keeps_its_data_shards(cache, tmp_path):
    demo = tmp_path / "demo"
    make_demo_data(demo, n=24, seed=0, n_heldout=2)
    data = grain(demo)
    ref, w = tmp_path / "reference", tmp_path / "elastic"
    run(ref, cache, tmp_path / "ref-log", data, "--gin.train.mesh={'fsdp': 4}")
    stop_early(w, launch(w, cache, tmp_path / "log-1", data, "--gin.train.mesh={'fsdp': 4}", delay=0.5))
    run(w, cache, tmp_path / "log-2", data, "--resume", processes=2)
    assert_same_run(w, (tmp_path / "log-1", tmp_path / "log-2"), ref, tmp_path / "ref-log")
    # Another number of data shards cannot continue this stream: refused in one line, exit 2.
    (proc,) = launch(w, cache, tmp_path / "log-3", (*data, "--gin.grain_data.data_shards=1"), "--resume")
    rc, log = finish(proc)
    assert rc == 2 and "must stay the same on resume: set --gin.grain_data.data_shards=2" in log, log
