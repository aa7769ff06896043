"""`sail-jax jsonl-to-arrayrecord`: one ArrayRecord record per JSONL line, for large corpora with random access."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jsonl-to-arrayrecord", help="convert a LLaVA-style JSONL file to ArrayRecord")
    p.add_argument("--src", required=True, help="input .jsonl (a local path or a URL such as gs://...)")
    p.add_argument("--dst", required=True, type=Path, help="output .arrayrecord")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sail_jax.data.sources import jsonl_to_arrayrecord

    n = jsonl_to_arrayrecord(args.src, args.dst)
    print(f"wrote {args.dst}: {n} records")
    return 0
