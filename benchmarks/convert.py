"""Converter throughput and memory: a synthetic ~2 GB bf16 upstream checkpoint (2B shapes, fewer layers) is converted
HF -> Orbax -> HF, each direction in its own process; prints seconds, MB/s and peak RSS, and checks the goal
peak RSS <= 3 x largest tensor + 600 MB and that the round trip is byte-identical.

    PYTHONPATH=$PWD python benchmarks/convert.py [--llm-layers 6] [--vit-layers 2] [--scan-layers] [--keep DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converters.core import make_plan  # noqa: E402
from converters.hf_checkpoint import SafetensorsCheckpoint  # noqa: E402
from converters.hf_config import sailvl_config_dict  # noqa: E402
from converters.hf_writer import TensorSpec, write_safetensors_dir  # noqa: E402
from converters.mapping import model_entries  # noqa: E402
from sail_jax.config import get_preset  # noqa: E402
from sail_jax.params import abstract_model_params  # noqa: E402

MB = 10**6


def synth_checkpoint(directory: Path, llm_layers: int, vit_layers: int) -> tuple[int, int]:
    """2B widths with fewer layers, random bf16, written one tensor at a time; returns (total, largest) bytes."""
    cfg = get_preset("sailvl2-2b")
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, num_layers=llm_layers),
                      vision=dataclasses.replace(cfg.vision, num_layers=vit_layers))
    scanned = cfg.with_runtime(scan_layers=True)  # same upstream keys; the scanned abstract init is faster
    plan = make_plan(model_entries(scanned), abstract_model_params(scanned)["params"])
    shapes = plan.hf_shapes()
    specs = [TensorSpec(k, s, np.dtype("bfloat16")) for k, s in shapes.items()]
    rng = np.random.default_rng(0)

    def make(key: str) -> np.ndarray:
        return (rng.standard_normal(shapes[key], np.float32) * 0.02).astype("bfloat16")

    directory.mkdir(parents=True)
    write_safetensors_dir(directory, specs, make, max_shard_size=10**9)  # sharded + index, like the release
    (directory / "config.json").write_text(json.dumps(sailvl_config_dict(cfg, "bfloat16")))
    return sum(s.nbytes for s in specs), max(s.nbytes for s in specs)


# A tiny launcher process spawns the measured command and reports that child's own rusage. (Spawning it straight
# from this process would not do: Linux carries the parent's RSS high-water mark into a forked child.)
_LAUNCHER = (
    "import os, sys\n"
    "pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ,"
    " file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, usage.ru_utime + usage.ru_stime)\n"
)


def run_measured(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS bytes) of `python *argv` in its own process."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, sys.executable, *argv], env=env, check=True,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - start
    code, maxrss_kib, cpu = out.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"failed ({code}): python {' '.join(argv)}")
    return seconds, float(cpu), int(maxrss_kib) * 1024


def same_tensors(a: Path, b: Path) -> bool:
    with SafetensorsCheckpoint(a) as x, SafetensorsCheckpoint(b) as y:
        if sorted(x.keys()) != sorted(y.keys()):
            return False
        return all(x[k].dtype == y[k].dtype and np.array_equal(x[k].view(np.uint16), y[k].view(np.uint16))
                   for k in x.keys())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm-layers", type=int, default=6)
    p.add_argument("--vit-layers", type=int, default=2)
    p.add_argument("--scan-layers", action="store_true", help="convert into the scanned (stacked) layout")
    p.add_argument("--keep", default=None, help="work in this directory and keep it")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="sailjax-convert-bench-"))
    try:
        src, ours, back = work / "hf", work / "orbax", work / "hf-back"
        total, largest = synth_checkpoint(src, args.llm_layers, args.vit_layers)
        print(f"synthetic checkpoint: {total / MB:.0f} MB bf16, largest tensor {largest / MB:.0f} MB "
              f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
        _, _, base_rss = run_measured(["-c", "import jax, converters.convert; jax.devices()"])
        print(f"interpreter + imports alone: peak RSS {base_rss / MB:.0f} MB")
        goal = 3 * largest + 600 * MB
        layout = ["--scan-layers"] if args.scan_layers else []
        ok = True
        cli = ["-m", "sail_jax", "convert"]
        for name, cmd in (
            ("hf-to-orbax", [*cli, "hf-to-orbax", "--src", str(src), "--dst", str(ours), "--no-progress", *layout]),
            ("orbax-to-hf", [*cli, "orbax-to-hf", "--src", str(ours), "--dst", str(back), "--no-progress"]),
        ):
            seconds, cpu, rss = run_measured(cmd)
            ok &= rss <= goal
            print(f"{name:12s} {seconds:6.1f} s wall ({cpu:5.1f} s CPU)  {total / MB / seconds:6.1f} MB/s  "
                  f"peak RSS {rss / MB:5.0f} MB  (goal <= {goal / MB:.0f} MB: {'ok' if rss <= goal else 'EXCEEDED'})")
        identical = same_tensors(src, back)
        print(f"round trip byte-identical: {identical}")
        if not (ok and identical):
            raise SystemExit(1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
