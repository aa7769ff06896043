"""`sail-jax compile`: compile the train step of a gin config ahead of time and print its memory per device.

    sail-jax compile --gin_file=configs/stage/sft.gin --gin_file=configs/model/8b.gin --gin.train.steps=1000 \\
        --topology=v5p:8x8x4 [--gin.train.mesh="{'fsdp': -1, 'tensor': 4}"] [--max_tiles 16] [--out report.json]

It reads the same gin files as `train` and compiles the same jitted step (model, optimizer, trainable groups,
mesh, loss budget, batch shapes), so a run can be sized before the slice is held. `--topology` names a TPU
topology; its devices are compile-only, so this needs libtpu but no TPU (without it: this host's devices).
The data and workdir need not be set. Exit code 1 when the step does not fit the devices' HBM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sail_jax.cli._common import add_gin_args

TRAIN_ARGS = ("model", "batch_size", "seq_len", "trainable", "optimizer", "mesh", "target_fraction", "steps")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a config's train step ahead of time; memory per device",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gin_args(p)
    p.add_argument("--topology", default=None,
                   help="TPU topology to compile for, e.g. v5p:4x4x4, v5e:4x8, v6e:8x8 (needs libtpu)")
    p.add_argument("--max_tiles", type=int, default=None,
                   help="tile slots per row (default: the data factory's max_tiles)")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.topology and "JAX_PLATFORMS" not in os.environ:
        # The TPU devices are compile-only: keep JAX from also initialising a TPU backend on this host.
        import jax

        jax.config.update("jax_platforms", "cpu")
    from sail_jax.data.pipeline import DataConfig
    from sail_jax.training import aot, gin_setup

    overrides = gin_setup.rewrite_gin_args(args.gin_flags)
    gin_setup.parse(args.gin_file, [*args.gin_bindings, *overrides], args.gin_search_path, required=("MODEL",),
                    finalize=False)
    kwargs = gin_setup.train_arguments(TRAIN_ARGS)
    max_tiles = args.max_tiles if args.max_tiles is not None else gin_setup.data_option(
        "max_tiles", DataConfig.max_tiles)
    devices = aot.topology_devices(args.topology)
    _, report = aot.compile_train_step(**kwargs, max_tiles=int(max_tiles), devices=devices)
    where = args.topology or "this host"
    print(f"{where}: batch {kwargs['batch_size']} x {kwargs['seq_len']} tokens, {max_tiles} tile slots per row, "
          f"trainable {list(kwargs['trainable'])}: {report.summary()}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({"topology": args.topology, "max_tiles": int(max_tiles),
                                   "batch_size": kwargs["batch_size"], "seq_len": kwargs["seq_len"],
                                   **report.as_dict()}, indent=2) + "\n")
        tmp.replace(out)
    if report.fits is False:
        print("sail-jax compile: the step does not fit the device memory", file=sys.stderr)
        return 1
    return 0
