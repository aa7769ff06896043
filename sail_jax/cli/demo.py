"""`sail-jax demo` (the end-to-end demo: synthetic data, eval, train, eval, plot, HF export on CPU) and
`sail-jax make-demo-data` (its deterministic synthetic shapes data: PNG + LLaVA JSONL + eval questions)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the small SAIL-VL2 on generated shapes data and show accuracy rising")
    p.add_argument("--out", default="demo_out", help="directory for data, run, loss.png, hf/ and results")
    p.add_argument("--n", type=int, default=3000, help="number of training samples to generate")
    p.add_argument("--n-heldout", type=int, default=1500,
                   help="held-out samples; ~3/4 of them give one scored question (1,125 by default, so the "
                        "accuracy is good to about +-1.3 points)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps of configs/demo.gin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-export", action="store_true", help="skip the Hugging Face export")
    p.set_defaults(func=run_demo_command)

    p = sub.add_parser("make-demo-data", help="write synthetic coloured-shape images with captions and VQA "
                                              "conversations (train/held-out LLaVA JSONL + eval questions)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--n", type=int, default=2000, help="training samples")
    p.add_argument("--n-heldout", type=int, default=None, help="held-out samples (default n/10, at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=make_demo_data_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from sail_jax.evaluation.demo import run_demo

    result = run_demo(args.out, n=args.n, seed=args.seed, n_heldout=args.n_heldout, steps=args.steps,
                      export=not args.no_export)
    return 0 if result["accuracy_after"] > result["accuracy_before"] else 1


def make_demo_data_command(args: argparse.Namespace) -> int:
    from sail_jax.evaluation.demo import make_demo_data

    counts = make_demo_data(args.out, args.n, args.seed, args.n_heldout)
    print(f"wrote {args.out}: " + ", ".join(f"{name} ({k} records)" for name, k in counts.items()))
    return 0
