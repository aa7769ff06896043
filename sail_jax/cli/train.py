"""`sail-jax train`: gin-configured training (t5x-style flags).

    sail-jax train --gin-file=configs/stage/sft.gin --gin-file=configs/model/2b.gin \\
        --gin.DATA=@synthetic_data --gin.WORKDIR=\\"/tmp/run\\" [--gin-bindings='train.steps = 10'] [--resume]

A later file or binding overrides one field and keeps the rest: --gin.RuntimeConfig.attention_impl="'pallas'".
`--dry-run` resolves and checks the config, prints it (model, runtime, optimizer, data, mesh) and creates nothing.

Multi-host: every host runs the same command with --coordinator-address/--num-processes/--process-id (or the
JAX_* environment variables, or --distributed for JAX's cluster auto-detection).
"""

from __future__ import annotations

import argparse
import os
import sys

from sail_jax.cli._common import add_gin_args

EPILOG = """exit status:
  0    the run reached train.steps
  1    aborted (non-finite steps in a row) or a checkpoint could not be written
  2    bad input (config, data, a resume that changes the schedule without --allow-schedule-change)
  143  preempted: SIGTERM checkpointed the next step boundary; rerun with --resume (schedulers requeue on it)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train with gin configs (see configs/)", description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gin_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the workdir's latest checkpoint")
    p.add_argument("--allow-schedule-change", action="store_true",
                   help="on --resume, accept a train.steps or learning-rate schedule that differs from the "
                        "checkpoint's (refused otherwise: the rate would jump)")
    p.add_argument("--anyres", action="store_true",
                   help="SAIL-ViT-AnyRes inputs (VisionConfig.anyres = True): native-resolution images packed into "
                        "grain_data.max_patches patch slots per row instead of tiles")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve and check the config, print it, create nothing (no workdir) and exit")
    p.add_argument("--coordinator-address", default=None, help="host:port of process 0 (multi-host)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--distributed", action="store_true", help="let JAX auto-detect the cluster (TPU pods, SLURM)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sail_jax.training import distributed

    # Before anything touches a JAX device.
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id, auto=args.distributed)

    import gin
    import jax

    from sail_jax.training import gin_setup
    from sail_jax.training.checkpointing import CheckpointSaveFailed
    from sail_jax.training.program import LAYOUT_ARGS, run_layout
    from sail_jax.training.trainer import PREEMPTED_EXIT_CODE, Preempted, TrainingAborted

    sys.unraisablehook = _quiet_closed_loop
    overrides = gin_setup.rewrite_gin_args(args.gin_flags)
    anyres = ["VisionConfig.anyres = True"] if args.anyres else []
    gin_setup.parse(args.gin_file, [*args.gin_bindings, *overrides, *anyres], args.gin_search_path)
    # Every binding is checked (and the mesh laid out) before the workdir exists.
    resolved, steps_note = gin_setup.resolve_train(cache_in_workdir=not args.dry_run)
    mesh, _ = run_layout(**{k: resolved[k] for k in LAYOUT_ARGS})
    if args.dry_run:
        print(gin_setup.describe(resolved, dict(mesh.shape), steps_note))
        return 0
    with gin_setup.run_workdir() as workdir:
        if steps_note and jax.process_index() == 0:
            print(steps_note, file=sys.stderr)
        try:  # the steps as resolved: derived when train.epochs gives the run length
            last = gin_setup.train_using_gin(resume=args.resume, steps=resolved["steps"],
                                             **({"allow_schedule_change": True} if args.allow_schedule_change else {}))
        except Preempted as e:
            if jax.process_index() == 0:
                print(e, file=sys.stderr, flush=True)
            return PREEMPTED_EXIT_CODE
        except TrainingAborted as e:
            print(f"sail-jax train: aborted: {e}", file=sys.stderr)
            return 1
        except FileNotFoundError:
            raise  # a missing input: the user error line, exit 2
        except (CheckpointSaveFailed, OSError) as e:
            # Disk full, permissions, a vanished mount: one line, not the traceback of every writer thread. The
            # checkpoint writers' pending futures would each log a traceback again at interpreter exit, so the
            # process ends here (the metrics and earlier checkpoints are already closed and complete).
            detail = str(e).split("\n")[0] if isinstance(e, CheckpointSaveFailed) else f"{type(e).__name__}: {e}"
            print(f"sail-jax train: failed: {detail}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
    if jax.process_index() == 0:
        (workdir / "operative_config.gin").write_text(gin.operative_config_str())
        if last:
            print(f"done: step metrics {', '.join(f'{k}={v:.4g}' for k, v in sorted(last.items()))}",
                  file=sys.stderr)
    return 0


def _quiet_closed_loop(unraisable) -> None:
    """After a failed checkpoint write, TensorStore completes the writer's futures on the event loop Orbax already
    closed, each printing `RuntimeError: Event loop is closed`; the failure itself is reported once."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)
