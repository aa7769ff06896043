"""The trainer as separate processes: SIGKILL / SIGTERM and exact resume, and a 2-process (multi-host) run.

All runs use tests/data/trainer_tiny.gin through `sail-jax train` (tests/train_driver.py adds a slow data
factory so signals land between steps) and share a persistent compilation cache, so only the first process of
each kind compiles.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sail_jax.training.trainer import PREEMPTED_EXIT_CODE
from tests.trainer_utils import REPO, TINY_GIN, load_item, metrics, trees_equal

DRIVER = str(REPO / "tests" / "train_driver.py")


def env(cache: Path, devices: int = 8) -> dict[str, str]:
    e = dict(os.environ)
    # LLVM optimisation off: these processes compile the same small programs and compare only with each other,
    # and -O0 halves the compile time that dominates them.
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    e.update(
        PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
        JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return e


def start(workdir: Path, cache: Path, *extra: str, delay: float = 0.0, devices: int = 8) -> subprocess.Popen:
    args = [sys.executable, DRIVER, "train", f"--gin_file={TINY_GIN}", f"--gin.WORKDIR='{workdir}'",
            "--gin.DATA=@slow_synthetic_data", f"--gin.slow_synthetic_data.delay_s={delay}", *extra]
    log = workdir.parent / f"{workdir.name}-{time.monotonic_ns()}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(args, env=env(cache, devices), stdout=f, stderr=subprocess.STDOUT)
    proc.log_path = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    return rc, proc.log_path.read_text()


def complete_steps(workdir: Path) -> list[int]:
    """Finalised checkpoint steps (Orbax renames a step's temporary directory only when it is complete)."""
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def logged_beyond(workdir: Path, step: int) -> bool:
    """metrics.jsonl has a step > `step` (a line being written or rewritten reads as not yet)."""
    try:
        return metrics(workdir)[-1]["step"] > step
    except (FileNotFoundError, IndexError, ValueError):
        return False


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the test could signal it")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    workdir = tmp_path_factory.mktemp("procs") / "reference"
    rc, log = finish(start(workdir, cache))
    assert rc == 0, log
    return workdir


def test_sigkill_then_sigterm_then_resume_is_bit_exact(reference, cache, tmp_path):
    w = tmp_path / "run"
    # 1. killed hard at an arbitrary step after the first checkpoint
    proc = start(w, cache, delay=0.5)
    wait_for(lambda: complete_steps(w), proc)
    proc.send_signal(signal.SIGKILL)
    rc, log = finish(proc)
    killed_at = complete_steps(w)[-1]
    assert rc == -signal.SIGKILL and killed_at < 6, log
    # 2. resumed, then preempted with SIGTERM: checkpoint at the next step boundary, exit 143 (requeue)
    proc = start(w, cache, "--resume", delay=0.5)
    wait_for(lambda: logged_beyond(w, killed_at), proc)
    proc.send_signal(signal.SIGTERM)
    rc, log = finish(proc)
    preempted_at = complete_steps(w)[-1]
    assert rc == PREEMPTED_EXIT_CODE == 143 and f"SIGTERM: checkpointed step {preempted_at}" in log, log
    assert killed_at < preempted_at < 6
    # 3. resumed to the end: identical to the uninterrupted run, bit for bit
    rc, log = finish(start(w, cache, "--resume"))
    assert rc == 0, log
    for item in ("params", "opt_state"):
        assert trees_equal(load_item(w, 6, item), load_item(reference, 6, item)), item
    assert [r["loss"] for r in metrics(w)] == [r["loss"] for r in metrics(reference)]
    assert load_item(w, 6, "train_state")["step"] == 6


def test_two_processes_reach_the_losses_of_one(reference, cache, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    w = tmp_path / "multihost"
    w.mkdir()
    # 2 processes x 2 CPU devices = the reference's 4-device {data: 2, fsdp: 2} mesh; each feeds 2 of 4 rows.
    procs = [start(w, cache, f"--coordinator-address=localhost:{port}", "--num-processes=2", f"--process-id={i}",
                   devices=2) for i in range(2)]
    results = [finish(p) for p in procs]
    for rc, log in results:
        assert rc == 0, log
    ours, ref = metrics(w), metrics(reference)
    assert [r["step"] for r in ours] == list(range(1, 7))  # only process 0 writes metrics
    np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in ref], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in ours], [r["grad_norm"] for r in ref], rtol=1e-4)
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in ref]


def _same_as_reference(w: Path, reference: Path) -> None:
    for item in ("params", "opt_state"):
        assert trees_equal(load_item(w, 6, item), load_item(reference, 6, item)), item
    assert [r["loss"] for r in metrics(w)] == [r["loss"] for r in metrics(reference)]


def test_killed_at_random_moments_every_resume_continues_bit_exactly(reference, cache, tmp_path):
    """10 SIGKILLs at seeded random moments: half as soon as a checkpoint write is seen in progress (Orbax's
    temporary step directory), half at a random point after a random step; each resume must continue exactly."""
    rng = np.random.default_rng(24)
    w = tmp_path / "faults"
    ckpts = w / "checkpoints"
    in_write, kills, done = 0, 0, False
    while kills < 10 and not done:
        proc = start(w, cache, *(["--resume"] if ckpts.exists() else []), delay=0.2)
        if kills % 2 == 0:
            def writing() -> bool:
                return ckpts.exists() and any(".orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir())
        else:
            target = (complete_steps(w) or [0])[-1] + int(rng.integers(0, 3))

            def writing(target: int = target) -> bool:
                return logged_beyond(w, target)
        t0 = time.monotonic()
        while not writing() and proc.poll() is None and time.monotonic() - t0 < 300:
            time.sleep(0.002)
        if proc.poll() is not None:  # the run finished before the chosen moment
            rc, log = finish(proc)
            assert rc == 0, log
            done = True
            break
        time.sleep(float(rng.uniform(0, 0.02 if kills % 2 == 0 else 0.2)))
        in_write += any(".orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir()) if ckpts.exists() else 0
        proc.send_signal(signal.SIGKILL)
        rc, log = finish(proc)
        assert rc in (-signal.SIGKILL, 0), log
        done, kills = rc == 0, kills + (rc != 0)
    if not done:
        rc, log = finish(start(w, cache, "--resume"))
        assert rc == 0, log
    assert kills >= 5 and in_write >= 1, (kills, in_write)
    _same_as_reference(w, reference)


def test_a_corrupt_checkpoint_falls_back_and_the_run_ends_as_uninterrupted(reference, cache, tmp_path):
    import shutil

    w = tmp_path / "corrupt"
    shutil.copytree(reference, w)
    chunks = [p for p in (w / "checkpoints" / "6" / "params").rglob("*") if p.is_file()]
    f = max(chunks, key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x10
    f.write_bytes(bytes(data))
    (w / "metrics.jsonl").write_text((w / "metrics.jsonl").read_text() + '{"step": 7, "lo')  # torn line
    rc, log = finish(start(w, cache, "--resume"))
    assert rc == 0, log
    rel = f.relative_to(w / "checkpoints" / "6")
    assert f"warning: checkpoint 6 unreadable: {rel}: checksum mismatch" in log, log
    assert "resuming from checkpoint 5, the newest that verifies" in log
    assert "dropped 1 unparsable line" in log
    _same_as_reference(w, reference)


def test_a_second_run_on_the_same_workdir_is_refused(cache, tmp_path):
    w = tmp_path / "busy"
    first = start(w, cache, delay=0.3)
    wait_for(lambda: (w / ".lock").exists() and (w / "config.gin").exists(), first)
    rc, log = finish(start(w, cache))
    assert rc == 2 and f"sail-jax train: error: workdir {w} is in use by another run (pid {first.pid} on " in log, log
    wait_for(lambda: logged_beyond(w, 0), first)  # the SIGTERM handler is installed
    first.send_signal(signal.SIGTERM)
    rc, log = finish(first)
    assert rc == PREEMPTED_EXIT_CODE, log


def test_disk_full_is_one_line(cache, tmp_path):
    """A 3 MiB tmpfs holds two checkpoints of the tiny model; the third write fails (real ENOSPC)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        rc, log = finish(start(mnt / "w", cache))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert rc == 1, log
    # XLA's own C++ log lines (compiler warnings on a cold compile cache) are not ours.
    failure = [ln for ln in log.splitlines()
               if not re.match(r"(\S+Z\s+)?(step |steps |first step)", ln) and not re.match(r"[IWE]\d{4} ", ln)]
    assert len(failure) == 1 and failure[0].startswith("sail-jax train: failed: saving checkpoint "), log
    assert "No space left on device" in failure[0] or "RESOURCE_EXHAUSTED" in failure[0]
