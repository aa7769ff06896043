"""Model soup memory: four random bf16 checkpoints of a model whose largest tensors (the ~195 MB embedding and
lm_head: vocab 151936 x hidden 640) dwarf the rest are souped by `sail-jax soup` in its own process, in both
formats; prints the peak RSS of 2- and 4-input soups and checks the goal peak RSS <= 3 x largest tensor + 600 MB
(the 2-input figure shows the peak does not grow with the number of inputs).

    PYTHONPATH=$PWD python benchmarks/soup.py [--formats upstream,ours] [--keep DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.convert import run_measured  # noqa: E402
from converters.convert import hf_to_orbax  # noqa: E402
from converters.core import make_plan  # noqa: E402
from converters.hf_config import from_hf_config, sailvl_config_dict  # noqa: E402
from converters.hf_writer import TensorSpec, write_safetensors_dir  # noqa: E402
from converters.mapping import model_entries  # noqa: E402
from sail_jax.params import abstract_model_params  # noqa: E402

MB = 10**6
TINY = REPO / "tests" / "data" / "sailvl2-tiny" / "checkpoint"


def synth_checkpoints(root: Path, n: int) -> tuple[list[Path], int]:
    """`n` upstream directories of the tiny fixture's model widened to hidden 640, random bf16 weights written one
    tensor at a time; returns (directories, largest tensor bytes)."""
    cfg = from_hf_config(TINY)
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, hidden_size=640))
    shapes = make_plan(model_entries(cfg), abstract_model_params(cfg)["params"]).hf_shapes()
    specs = [TensorSpec(k, s, np.dtype("bfloat16")) for k, s in shapes.items()]
    dirs = []
    for i in range(n):
        rng = np.random.default_rng(i)
        d = root / f"in{i}"
        d.mkdir(parents=True)
        write_safetensors_dir(d, specs, lambda k, rng=rng: (0.02 * rng.standard_normal(shapes[k], np.float32)).astype(
            np.dtype("bfloat16")))
        (d / "config.json").write_text(json.dumps(sailvl_config_dict(cfg, "bfloat16")))
        dirs.append(d)
    return dirs, max(s.nbytes for s in specs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default="upstream,ours", help="comma-separated: upstream, ours")
    p.add_argument("--keep", default=None, help="work in this directory and keep it")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="sailjax-soup-bench-"))
    try:
        upstream, largest = synth_checkpoints(work / "upstream", 4)
        total = sum(f.stat().st_size for f in upstream[0].glob("*.safetensors"))
        print(f"4 synthetic checkpoints of {total / MB:.0f} MB bf16 each, largest tensor {largest / MB:.0f} MB "
              f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
        _, _, base_rss = run_measured(["-c", "import jax, converters.soup, sail_jax.cli; jax.devices()"])
        print(f"interpreter + imports alone: peak RSS {base_rss / MB:.0f} MB")
        goal = 3 * largest + 600 * MB
        ok = True
        for fmt in args.formats.split(","):
            if fmt == "upstream":
                inputs = upstream
            elif fmt == "ours":
                inputs = [work / "ours" / d.name for d in upstream]
                for src, dst in zip(upstream, inputs):
                    hf_to_orbax(src, dst, progress=False)
            else:
                raise SystemExit(f"unknown format {fmt!r}")
            for n in (2, 4):
                out = work / f"soup-{fmt}-{n}"
                cmd = ["-m", "sail_jax", "soup", "--no-progress", "--out", str(out),
                       *[a for d in inputs[:n] for a in ("--checkpoint", str(d))]]
                seconds, cpu, rss = run_measured(cmd)
                within = rss <= goal
                ok &= within or n != 4
                print(f"{fmt:8s} {n} inputs  {seconds:6.1f} s wall ({cpu:5.1f} s CPU)  peak RSS {rss / MB:5.0f} MB  "
                      f"(goal <= {goal / MB:.0f} MB: {'ok' if within else 'EXCEEDED'})")
                shutil.rmtree(out)
        if not ok:
            raise SystemExit(1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
