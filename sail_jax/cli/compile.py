"""`sail-jax compile`: compile the train step of a gin config ahead of time and print its memory per device.

    sail-jax compile --gin-file=configs/stage/sft.gin --gin-file=configs/model/8b.gin --gin.train.steps=1000 \\
        --topology=v5p:8x8x4 [--gin.train.mesh="{'fsdp': -1, 'tensor': 4}"] [--max-tiles 16] [--tile-budget 24] \\
        [--out report.json]

It reads the same gin files as `train` and compiles the same jitted step (model, optimizer, trainable groups,
mesh, loss budget, batch shapes), so a run can be sized before the slice is held. `--topology` names a TPU
topology; its devices are compile-only, so this needs libtpu but no TPU (without it: this host's devices).
The data and workdir need not be set. `--tile-budget N` (default: the data factory's `tile_budget` when it is a
number) compiles the budgeted batch, whose ViT runs on N tiles per batch shard instead of rows x max_tiles slots.
Exit code 1 when the step does not fit the devices' HBM. `--dry-run` resolves and checks the config and prints it
(model, runtime, optimizer, data, mesh) without compiling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sail_jax.cli._common import add_gin_args

TRAIN_ARGS = ("model", "batch_size", "seq_len", "trainable", "optimizer", "mesh", "target_fraction", "steps",
              "microbatches")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a config's train step ahead of time; memory per device",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gin_args(p)
    p.add_argument("--topology", default=None,
                   help="TPU topology to compile for, e.g. v5p:4x4x4, v5e:4x8, v6e:8x8 (needs libtpu)")
    p.add_argument("--max-tiles", type=int, default=None,
                   help="tile slots per row (default: the data factory's max_tiles; an AnyRes model: patch slots, "
                        "default its max_patches)")
    p.add_argument("--tile-budget", type=int, default=None,
                   help="tiles per batch shard the ViT runs on (default: the data factory's tile_budget if a number; "
                        "otherwise fixed slots)")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    p.add_argument("--dry-run", action="store_true", help="resolve and check the config, print it; compile nothing")
    p.set_defaults(func=run)


def resolve_config(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
                   max_tiles: int | None = None) -> tuple[dict[str, Any], int]:
    """Parse gin as `train` does (data and workdir optional); (the checked `train` arguments compiled, tile slots)."""
    from sail_jax.data.pipeline import DataConfig
    from sail_jax.training import gin_setup

    gin_setup.parse(gin_files, bindings, search_paths, required=("MODEL",), finalize=False)
    kwargs = gin_setup.train_arguments(TRAIN_ARGS)
    if max_tiles is None and kwargs["model"].vision.anyres:  # AnyRes rows hold patch slots, not tiles
        max_tiles = gin_setup.data_option("max_patches", DataConfig.max_patches)
    elif max_tiles is None:
        max_tiles = gin_setup.data_option("max_tiles", DataConfig.max_tiles)
    return kwargs, int(max_tiles)


def tile_budget_option(tile_budget: int | None) -> int | None:
    """`--tile-budget`, else the data factory's `tile_budget` when it is a number (after `resolve_config`)."""
    from sail_jax.training import gin_setup

    if tile_budget is not None:
        return tile_budget
    bound = gin_setup.data_option("tile_budget", None)
    return bound if isinstance(bound, int) else None


def compile_config(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
                   max_tiles: int | None = None, topology: str | None = None, tile_budget: int | None = None
                   ) -> tuple[dict[str, Any], Any]:
    """Parse gin as `train` does, compile its step; (what was compiled, report)."""
    from sail_jax.training import aot

    kwargs, max_tiles = resolve_config(gin_files, bindings, search_paths, max_tiles)
    tile_budget = tile_budget_option(tile_budget)
    _, report = aot.compile_train_step(**kwargs, max_tiles=max_tiles, tile_budget=tile_budget,
                                       devices=aot.topology_devices(topology))
    what = {"topology": topology, "max_tiles": max_tiles, "tile_budget": tile_budget,
            "batch_size": kwargs["batch_size"],
            "seq_len": kwargs["seq_len"], "microbatches": kwargs["microbatches"],
            "trainable": list(kwargs["trainable"])}
    return what, report


def dry_run(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
            max_tiles: int | None = None, topology: str | None = None) -> str:
    """The operative config `compile` would compile, with its mesh laid out on the target devices."""
    from sail_jax.training import aot, gin_setup
    from sail_jax.training.program import LAYOUT_ARGS, run_layout

    kwargs, max_tiles = resolve_config(gin_files, bindings, search_paths, max_tiles)
    mesh, _ = run_layout(**{k: kwargs[k] for k in LAYOUT_ARGS}, devices=aot.topology_devices(topology))
    return (gin_setup.describe(kwargs, dict(mesh.shape))
            + f"\ncompile: topology={topology or 'this host'}, max_tiles={max_tiles}")


def write_report(path: str | Path, what: dict[str, Any], report: Any) -> None:
    """The report as JSON, written under a temporary name and renamed (never half-written)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({**what, **report.as_dict()}, indent=2) + "\n")
    tmp.replace(out)


def run(args: argparse.Namespace) -> int:
    if args.topology and "JAX_PLATFORMS" not in os.environ:
        # The TPU devices are compile-only: keep JAX from also initialising a TPU backend on this host.
        import jax

        jax.config.update("jax_platforms", "cpu")
    from sail_jax.training import gin_setup

    bindings = [*args.gin_bindings, *gin_setup.rewrite_gin_args(args.gin_flags)]
    if args.dry_run:
        print(dry_run(args.gin_file, bindings, args.gin_search_path, args.max_tiles, args.topology))
        return 0
    what, report = compile_config(args.gin_file, bindings, args.gin_search_path, args.max_tiles, args.topology,
                                  args.tile_budget)
    tiles = (f"{what['max_tiles']} tile slots per row" if what["tile_budget"] is None
             else f"tile budget {what['tile_budget']} per batch shard")
    print(f"{args.topology or 'this host'}: batch {what['batch_size']} x {what['seq_len']} tokens, "
          f"{tiles}, trainable {what['trainable']}: {report.summary()}")
    if args.out:
        write_report(args.out, what, report)
    if report.fits is False:
        print("sail-jax compile: the step does not fit the device memory", file=sys.stderr)
        return 1
    return 0
