"""glibc malloc tuning for XLA:CPU (sail_jax/host_malloc.py): env merging, when it applies, the CLI re-exec, and
the effect it exists for (large XLA buffers stop being page-faulted afresh on every call)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sail_jax import cli, host_malloc

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def test_tuned_env_keeps_user_tunables_and_marks_itself():
    env = host_malloc.tuned_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.pthread.rseq=0", "A": "b"})
    tunables = env["GLIBC_TUNABLES"].split(":")
    assert tunables[:2] == ["glibc.malloc.arena_max=4", "glibc.pthread.rseq=0"]  # the user's values win
    assert "glibc.malloc.arena_max=1" not in tunables
    assert {"glibc.malloc.mmap_max=0", "glibc.malloc.hugetlb=1"} <= set(tunables)
    assert env["A"] == "b" and not host_malloc.wanted(env)  # the re-executed process does not loop


@pytest.mark.skipif(not GLIBC, reason="glibc Linux only")
@pytest.mark.parametrize("env, expected", [
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "cuda"}, False),
    ({"JAX_PLATFORMS": "tpu", "SAIL_JAX_MALLOC_TUNING": "1"}, True),
    ({"JAX_PLATFORMS": "cpu", "SAIL_JAX_MALLOC_TUNING": "0"}, False),
])
def test_wanted(env, expected):
    assert host_malloc.wanted(env) is expected


def test_cli_reexecs_itself_once_with_the_tunables(monkeypatch):
    calls = []
    monkeypatch.setattr(host_malloc, "wanted", lambda env: True)
    monkeypatch.setattr(os, "execve", lambda exe, args, env: calls.append((exe, args, env)) or sys.exit(0))
    monkeypatch.setattr(sys, "argv", ["sail-jax", "plot", "--workdir", "w"])
    with pytest.raises(SystemExit):
        cli.main()
    (exe, args, env), = calls
    assert exe == sys.executable and args == host_malloc.reexec_command(["plot", "--workdir", "w"])
    assert args[:2] == [sys.executable, "-P"] and args[-3:] == ["plot", "--workdir", "w"]
    assert "glibc.malloc.mmap_max=0" in env["GLIBC_TUNABLES"]
    calls.clear()
    # called from Python with explicit arguments: runs here (a clear error for the missing workdir), no re-exec
    assert cli.main(["plot", "--workdir", "/nonexistent/run"]) == 2
    assert not calls


@pytest.mark.skipif(not GLIBC, reason="glibc Linux only")
def test_reexec_runs_this_package_not_one_in_the_working_directory(tmp_path):
    """Started (like the console script: no working directory on sys.path) from a directory holding another
    `sail_jax`, the re-executed process runs the package that started, not that directory's."""
    decoy = tmp_path / "sail_jax"
    decoy.mkdir()
    for name in ("__init__.py", "__main__.py"):
        (decoy / name).write_text("raise SystemExit('decoy sail_jax imported')\n")
    root = Path(host_malloc.__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "SAIL_JAX_MALLOC_TUNED"}
    env |= {"SAIL_JAX_MALLOC_TUNING": "1", "PYTHONPATH": str(root)}
    assert host_malloc.wanted(env)
    start = "import sys; from sail_jax.cli import main; sys.exit(main())"
    out = subprocess.run([sys.executable, "-P", "-c", start, "--version"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "decoy" not in out.stderr, out.stderr
    assert out.stdout.startswith("sail-jax ")


_PROBE = """
import json, resource, jax, jax.numpy as jnp
x = jnp.ones((64, 1 << 18))  # 64 MiB: over glibc's largest mmap threshold
f = jax.jit(lambda x: x * 2.0)
f(x).block_until_ready()
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(x).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc Linux only")
def test_tunables_stop_refaulting_large_buffers():
    def faults(env: dict[str, str]) -> float:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")} | {"JAX_PLATFORMS": "cpu"}
    stock, tuned = faults(base), faults(host_malloc.tuned_env(base))
    pages = 64 * (1 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert stock > 0.5 * pages  # stock glibc: every call faults its 64 MiB output in again
    assert tuned < 0.05 * pages, (stock, tuned)
