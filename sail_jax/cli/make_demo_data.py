"""`sail-jax make-demo-data`: deterministic synthetic shapes data (PNG + LLaVA JSONL + eval questions)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-demo-data", help="write synthetic coloured-shape images with captions and VQA "
                                              "conversations (train/held-out LLaVA JSONL + eval questions)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--n", type=int, default=2000, help="training samples")
    p.add_argument("--n-heldout", type=int, default=None, help="held-out samples (default n/10, at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sail_jax.data.demo_data import make_demo_data

    counts = make_demo_data(args.out, args.n, args.seed, args.n_heldout)
    print(f"wrote {args.out}: " + ", ".join(f"{name} ({k} records)" for name, k in counts.items()))
    return 0
