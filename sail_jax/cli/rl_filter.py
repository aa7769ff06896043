"""`sail-jax rl-filter`: keep the RL prompts the current model can learn from, by pass@k (paper §4.1.3).

    sail-jax rl-filter --checkpoint ckpt/ --data prompts.jsonl --k 4 --out kept.jsonl

Samples k answers per prompt; math/count prompts are kept when 0 < pass@k < 1, the others when pass@k < 1. The
kept records (with their "pass_at_k") go to --out, every prompt's pass@k to --scores.
"""

from __future__ import annotations

import argparse
import sys

from sail_jax.cli._common import add_model_args, load_engine, status


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rl-filter", help="filter RL prompts by the model's pass@k",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, help="RL prompt JSONL ({id, image?, question, answer, kind})")
    p.add_argument("--image-root", default=None, help="directory image paths are relative to (default: --data's)")
    p.add_argument("--k", type=int, default=4, help="answers sampled per prompt")
    p.add_argument("--out", required=True, help="JSONL of the kept prompts, each with its pass_at_k")
    p.add_argument("--scores", default=None, help="JSONL of every prompt's pass@k (default: OUT.passk.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="most tokens per sampled answer")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-prompts", type=int, default=8, help="prompts per engine call (x k rows)")
    p.add_argument("--max-tiles", type=int, default=None, help="tiles per image (default: the tokenizer's)")
    p.add_argument("--reasoning-kinds", default="math,count",
                   help="comma-separated kinds kept only when 0 < pass@k < 1 (others: pass@k < 1)")
    p.add_argument("--judge", default=None,
                   help="judge for 'open' answers: an http(s) URL or a 'pkg.module:function' import path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from sail_jax.inference.sampling import SamplingParams
    from sail_jax.rl.judge import make_judge
    from sail_jax.rl.pass_filter import pass_rates, read_records, write_filtered

    if args.k < 1 or args.batch_prompts < 1 or args.temperature <= 0:
        raise ValueError(f"--k ({args.k}) and --batch-prompts ({args.batch_prompts}) must be >= 1 and "
                         f"--temperature ({args.temperature}) > 0")
    records, bad = read_records(args.data, args.image_root)
    if bad:
        status(f"{args.data}: skipped {len(bad)} bad line(s); first: {bad[0]}")
    if not records:
        raise ValueError(f"{args.data}: no usable RL prompt")
    judge = make_judge(args.judge) if args.judge else None
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    engine, processor = load_engine(args)
    processor = dataclasses.replace(processor, image_size=engine.model.cfg.vision.image_size,
                                    **({"max_num": args.max_tiles} if args.max_tiles else {}))
    rates = list(pass_rates(engine, processor, [p for _, p in records], k=args.k, sampling=sampling,
                            batch_prompts=args.batch_prompts, judge=judge))
    kinds = tuple(k.strip() for k in args.reasoning_kinds.split(",") if k.strip())
    scores = args.scores or f"{args.out}.passk.jsonl"
    kept = write_filtered(args.out, scores, records, rates, kinds)
    print(f"kept {kept} of {len(records)} prompts -> {args.out} (pass@{args.k} of each: {scores})", file=sys.stderr)
    return 0
