"""`sail-jax rl`: RL post-training (DAPO for dense models, GSPO for MoE) with gin configs (t5x-style flags).

    sail-jax rl --gin_file=configs/rl/verifiable.gin --gin_file=configs/model/2b.gin \\
        --gin.PROMPTS=\\"rl.jsonl\\" --gin.WORKDIR=\\"/tmp/rl\\" --gin.rl.init_from=\\"/ckpt/sft\\" [--resume]

Stages: configs/rl/verifiable.gin (DAPO), verifiable_moe.gin (GSPO), mixed.gin (mixed reward with a judge).
Each episode logs to WORKDIR/metrics.jsonl and TensorBoard; a checkpoint every CheckpointConfig.every_steps
episodes (and at the end) resumes exactly with --resume.
"""

from __future__ import annotations

import argparse
import sys

from sail_jax.cli._common import add_gin_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rl", help="RL post-training (DAPO / GSPO) with gin configs (see configs/rl/)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gin_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the workdir's latest checkpoint")
    p.add_argument("--allow-schedule-change", action="store_true",
                   help="on --resume, accept a changed number of updates or optimizer schedule (refused otherwise)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from sail_jax.rl import gin_setup
    from sail_jax.training import gin_setup as train_gin
    from sail_jax.training.trainer import PREEMPTED_EXIT_CODE, Preempted

    overrides = train_gin.rewrite_gin_args(args.gin_flags)
    gin_setup.parse(args.gin_file, [*args.gin_bindings, *overrides], args.gin_search_path)
    gin_setup.rl_arguments()  # every binding checked before the workdir exists
    with train_gin.run_workdir(gin_setup.workdir()):
        try:
            last = gin_setup.rl_using_gin(resume=args.resume, **(
                {"allow_schedule_change": True} if args.allow_schedule_change else {}))
        except Preempted as e:
            if jax.process_index() == 0:
                print(e, file=sys.stderr, flush=True)
            return PREEMPTED_EXIT_CODE
    if last:
        keys = ("reward_mean", "accuracy", "loss", "dropped_all_correct", "dropped_all_wrong")
        print("done: " + ", ".join(f"{k}={last[k]:.4g}" for k in keys if k in last), file=sys.stderr)
    return 0
