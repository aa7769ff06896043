"""`sail-jax plot --workdir DIR`: loss curve PNG from DIR/metrics.jsonl."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot the training loss (and learning rate) of a workdir to a PNG")
    p.add_argument("--workdir", required=True, help="training workdir (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output PNG (default: WORKDIR/loss.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sail_jax.evaluation.plot import plot_loss

    out, n = plot_loss(Path(args.workdir), Path(args.out) if args.out else None)
    print(f"wrote {out} ({n} steps)")
    return 0
