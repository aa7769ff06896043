"""Ahead-of-time compile of the 8B and A3B train steps for a named TPU topology, from this (CPU) host.

    pip install 'libtpu==0.0.42.*'      # the release jax 0.10.2 pins; no TPU needed, only its compiler
    PYTHONPATH=$PWD python benchmarks/aot_tpu.py [--topology v5p:4x4x8] [--cases 8b,a3b] [--tile-budget N] [--out DIR]

Each case is `sail-jax compile` of a stage config: the same jitted step `sail-jax train` runs on the pod
(configs/stage/sft.gin: all parts trained, 512 rows x 8,192 tokens, half the positions in the loss budget; the
model gin: bf16 compute, fp32 parameters and AdamW state, scanned layers, full remat), compiled by libtpu for
the topology's compile-only devices. It prints what XLA allocates per device (arguments, temporaries, code)
against the chip's HBM, and the model FLOPs per device with the step time they take at the chip's peak.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU devices are compile-only; this host computes nothing

REPO = Path(__file__).resolve().parents[1]
# name -> (gin files, bindings): the mesh puts A3B's 128 experts on an 8-way `expert` axis, the rest on fsdp.
CASES: dict[str, tuple[list[str], list[str]]] = {
    "8b": (["configs/stage/sft.gin", "configs/model/8b.gin"], ["train.steps = 10000"]),
    "a3b": (["configs/stage/sft.gin", "configs/model/a3b.gin"],
            ["train.steps = 10000", "train.mesh = {'expert': 8, 'fsdp': -1}"]),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5p:4x4x8", help="TPU topology (default: 128 v5p chips)")
    p.add_argument("--cases", default="8b,a3b", help=f"comma-separated, from {sorted(CASES)}")
    p.add_argument("--max_tiles", type=int, default=16, help="tile slots per row (448-px tiles)")
    p.add_argument("--tile-budget", type=int, default=None,
                   help="compile the tile-budgeted batch: N tiles per chip through the ViT (default: fixed slots)")
    p.add_argument("--bindings", action="append", default=[],
                   help="extra gin binding for every case, e.g. \"RuntimeConfig.remat_policy = 'full'\"")
    p.add_argument("--out", default=None, help="write one JSON report per case into this directory")
    args = p.parse_args()
    os.chdir(REPO)

    from sail_jax.cli.compile import compile_config, write_report
    from sail_jax.training import aot

    devices = aot.topology_devices(args.topology)
    print(f"{args.topology}: {len(devices)} x {devices[0].device_kind}", flush=True)
    failed = False
    for name in args.cases.split(","):
        files, bindings = CASES[name][0], [*CASES[name][1], *args.bindings]
        what, report = compile_config(files, bindings, max_tiles=args.max_tiles, topology=args.topology,
                                      tile_budget=args.tile_budget)
        tiles = (f"{args.max_tiles} tiles per row" if args.tile_budget is None
                 else f"tile budget {args.tile_budget} per chip")
        print(f"{name}: {' + '.join(files)}, batch {what['batch_size']} x {what['seq_len']}, {tiles}: "
              f"{report.summary()}", flush=True)
        failed |= report.fits is False
        if args.out:
            write_report(Path(args.out) / f"{name}.json", {**what, "gin_files": files, "bindings": bindings}, report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
