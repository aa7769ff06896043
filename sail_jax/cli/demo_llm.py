"""`sail-jax demo-llm`: train the tiny Qwen3 on generated arithmetic and show the loss falling."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-llm", help="train the tiny Qwen3 LLM on generated arithmetic (CPU, ~1 min)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sail_jax.training.llm_demo import run as train

    result = train(steps=args.steps, seed=args.seed)
    if not result["last_loss"] < 0.6 * result["first_loss"]:
        print("the loss did not fall as expected")
        return 1
    return 0
