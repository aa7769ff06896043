"""`sail-jax eval`: score a checkpoint on a VLMEvalKit-format TSV with VLMEvalKit's prompts and the benchmark's
metric, writing VLMEvalKit's prediction file beside the results so its own evaluator can recompute the scores."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sail_jax.cli._common import add_model_args, load_engine
from sail_jax.evaluation.judging import JUDGED, NEEDS_JUDGE
from sail_jax.evaluation.predictions import PRED_FORMATS
from sail_jax.evaluation.scoring import KINDS
from sail_jax.files import as_path, write_text_atomic


def default_model_name(checkpoint: str) -> str:
    """The model's name in prediction file names: the checkpoint folder's name; a trainer step (`RUN/checkpoints/N`)
    is `RUN-stepN` (its bare number names nothing), a workdir (its newest step) is `RUN`; URLs alike."""
    path = as_path(checkpoint)
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}-step{path.name}"
    return path.name


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate on a VLMEvalKit TSV with VLMEvalKit's prompts; greedy decoding")
    add_model_args(p)
    p.add_argument("--data", required=True, help="benchmark .tsv (VLMEvalKit layout)")
    p.add_argument("--dataset-name", "--dataset", dest="dataset_name", default=None,
                   help="VLMEvalKit dataset name: selects the kind, metric, tile limit and prompt suffix "
                        "(default: the file stem)")
    p.add_argument("--kind", default=None, choices=KINDS,
                   help="how answers are extracted and scored (default: known from the dataset name)")
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
    p.add_argument("--judge", default=None, metavar="URL|pkg.module:fn",
                   help=f"LLM judge for {', '.join(JUDGED)} (the RL judge: an HTTP endpoint or a callable)")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge call")
    p.add_argument("--model-name", default=None,
                   help="model name in the prediction file name {model}_{dataset} (default: the checkpoint folder; "
                        "RUN-stepN for a trainer step RUN/checkpoints/N)")
    p.add_argument("--pred-format", choices=PRED_FORMATS, default="xlsx",
                   help="VLMEvalKit prediction file format (its PRED_FORMAT; tsv for answers over 32767 characters)")
    p.add_argument("--out", required=True,
                   help="results .json; beside it OUT_STEM.predictions.jsonl (per item, resumable) and "
                        "{model}_{dataset}.xlsx")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sail_jax.evaluation.data import read_tsv
    from sail_jax.evaluation.datasets import infer_kind
    from sail_jax.evaluation.predictions import (
        PredictionLog,
        fits_excel,
        prediction_file_name,
        write_predictions,
    )
    from sail_jax.evaluation.runner import EvalSettings, check_indices, evaluate
    from sail_jax.rl.judge import make_judge

    dataset = args.dataset_name or Path(args.data).stem
    known = infer_kind(dataset)
    kind = args.kind or (known[0] if known else None)
    if kind is None:
        raise ValueError(f"dataset {dataset!r} is not a known benchmark: give --kind ({', '.join(KINDS)})")
    metric = known[1] if known and known[0] == kind else None  # another kind than the benchmark's: accuracy only
    if metric in NEEDS_JUDGE and args.judge is None:
        raise ValueError(f"{dataset} ({metric}) is scored by an LLM judge: give --judge URL|pkg.module:function")
    if args.judge is not None and metric not in JUDGED:
        raise ValueError(f"--judge: dataset {dataset!r} has no judge prompt (judged: {', '.join(JUDGED)})")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    settings = EvalSettings(
        kind=kind,
        dataset=dataset,
        max_tiles=args.max_tiles,
        thinking=args.thinking,
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else (4096 if args.thinking else 1024),
        batch_size=args.batch_size,
        metric=metric,
    )
    judge = make_judge(args.judge, timeout_s=args.judge_timeout) if args.judge else None
    items = read_tsv(args.data, args.data_root, args.num_frames, args.fps)[: args.limit]
    check_indices(items, args.data)
    out = Path(args.out)
    model = args.model_name or default_model_name(args.checkpoint)
    header = {"sail_jax_eval": 1, "checkpoint": str(as_path(args.checkpoint)),
              "data": str(Path(args.data).resolve()), "kind": kind, "dataset": dataset, "max_tiles": args.max_tiles,
              "thinking": args.thinking, "max_new_tokens": settings.max_new_tokens}
    log = PredictionLog(out.with_name(out.stem + ".predictions.jsonl"), header)  # refuses other settings early
    try:
        engine, processor = load_engine(args)
        result, rows = evaluate(engine, processor, items, settings, source=args.data, log=log, judge=judge)
    finally:
        log.close()

    fmt = args.pred_format
    if fmt == "xlsx" and not fits_excel(rows):
        print("sail-jax eval: a cell exceeds Excel's 32767 characters: writing the prediction file as .tsv "
              "(VLMEvalKit reads it with PRED_FORMAT=tsv)", file=sys.stderr)
        fmt = "tsv"
    pred_file = out.parent / prediction_file_name(model, dataset, fmt)
    result = {"data": str(args.data), "predictions": str(log.path), "prediction_file": str(pred_file), **result}
    write_text_atomic(out, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    write_predictions(pred_file, rows)

    print(f"{dataset} ({kind}): accuracy {result['accuracy']:.4f} ({result['correct']}/{result['n']})")
    for name, cat in result["per_category"].items():
        print(f"  {name}: {cat['accuracy']:.4f} ({cat['correct']}/{cat['n']})")
    if metric is not None:
        print(f"{metric}: {json.dumps(result['scores'], ensure_ascii=False)}")
    print(f"wrote {out}, {pred_file}")
    if result["failed"]:
        for item, record in zip(items, result["items"]):
            error = record["error"]
            if error is not None:
                named = error.startswith(str(args.data))  # our input errors name the file and row themselves
                where = "" if named else f"{args.data}: row {item.row} (index {item.index}): "
                print(f"sail-jax eval: {where}{error}", file=sys.stderr)
        print(f"sail-jax eval: {result['failed']} of {result['n']} rows failed (their 'error' is in {out} and "
              f"{pred_file}; a rerun retries them)", file=sys.stderr)
        return 1
    return 0
