"""`sail-jax eval`: score a checkpoint on a VLMEvalKit-format TSV (MCQ, VQA, OCR or yes/no)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sail_jax.cli._common import add_model_args, load_engine
from sail_jax.evaluation.scoring import KINDS
from sail_jax.files import write_text_atomic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate on a VLMEvalKit TSV with VLMEvalKit's prompts; greedy decoding")
    add_model_args(p)
    p.add_argument("--data", required=True, help="benchmark .tsv (VLMEvalKit layout)")
    p.add_argument("--kind", required=True, choices=KINDS, help="how answers are extracted and scored")
    p.add_argument("--dataset-name", default=None,
                   help="VLMEvalKit dataset name: selects the tile limit and prompt suffix (default: the file stem)")
    p.add_argument("--max-tiles", type=int, default=None, help="override the per-dataset tile limit")
    p.add_argument("--thinking", action="store_true",
                   help="append the thinking instruction and score the \\boxed{} answer")
    p.add_argument("--data-root", default=None,
                   help="video benchmarks: directory the 'video' column's paths are relative to (default: the TSV's)")
    p.add_argument("--num-frames", type=int, default=16, help="video benchmarks: frames sampled uniformly per video")
    p.add_argument("--fps", type=float, default=None, help="video benchmarks: sample at this rate instead")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 1024, 4096 with --thinking (VLMEvalKit)")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together")
    p.add_argument("--out", required=True, help="results .json (summary, per-category accuracy, per-item records)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sail_jax.evaluation.data import read_tsv
    from sail_jax.evaluation.runner import EvalSettings, evaluate

    settings = EvalSettings(
        kind=args.kind,
        dataset=args.dataset_name or Path(args.data).stem,
        max_tiles=args.max_tiles,
        thinking=args.thinking,
        max_new_tokens=args.max_new_tokens or (4096 if args.thinking else 1024),
        batch_size=args.batch_size,
    )
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    items = read_tsv(args.data, args.data_root, args.num_frames, args.fps)[: args.limit]
    engine, processor = load_engine(args)
    result = {"data": str(args.data), **evaluate(engine, processor, items, settings, source=args.data)}
    write_text_atomic(args.out, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    print(f"{settings.dataset} ({settings.kind}): accuracy {result['accuracy']:.4f} "
          f"({result['correct']}/{result['n']})")
    for name, cat in result["per_category"].items():
        print(f"  {name}: {cat['accuracy']:.4f} ({cat['correct']}/{cat['n']})")
    print(f"wrote {args.out}")
    return 0
