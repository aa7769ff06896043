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
from pathlib import Path

from sail_jax.cli._common import add_gin_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rl", help="RL post-training (DAPO / GSPO) with gin configs (see configs/rl/)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gin_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the workdir's latest checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import gin

    from sail_jax.rl import gin_setup
    from sail_jax.training import distributed
    from sail_jax.training import gin_setup as train_gin

    overrides = train_gin.rewrite_gin_args(args.gin_flags)
    gin_setup.parse(args.gin_file, [*args.gin_bindings, *overrides], args.gin_search_path)
    gin_setup.rl_arguments()  # every binding checked before the workdir exists
    workdir = Path(gin_setup.workdir())
    workdir.mkdir(parents=True, exist_ok=True)
    with distributed.workdir_lock(workdir):
        (workdir / "config.gin").write_text(gin.config_str())
        last = gin_setup.rl_using_gin(resume=args.resume)
    if last:
        keys = ("reward_mean", "accuracy", "loss", "dropped_all_correct", "dropped_all_wrong")
        print("done: " + ", ".join(f"{k}={last[k]:.4g}" for k in keys if k in last), file=sys.stderr)
    return 0
