"""`sail-jax curate VERB --in F.jsonl --out G.jsonl [--report R.json]`: the paper's data-curation steps on LLaVA JSONL.

  filter          keep records whose judge scores pass thresholds (--preset caption|video-qa, --min, --reject)
  ngram-resample  thin records made of over-represented word n-grams (two passes; entropy before/after)
  dedup           first record of each (image content hash, normalised question)
  cot-clean       LongCoT cleaning: no system prompts or conflicting hints, <think>…</think> + \\boxed{},
                  redundant thoughts dropped, thought lengths balanced

Every verb streams, writes the output and a JSON report (kept, dropped per reason, bad lines with file:line)
atomically, and stops with nothing written when more than --max-bad-fraction of the lines are unusable.
"""

from __future__ import annotations

import argparse

from sail_jax.curation import cot_clean, dedup, judge_filter, ngram_resample


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="src", required=True, metavar="F.jsonl", help="input records (LLaVA JSONL)")
    p.add_argument("--out", required=True, metavar="G.jsonl", help="kept records")
    p.add_argument("--report", default=None, metavar="R.json",
                   help="JSON report of what was kept and dropped (default: OUT.report.json)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05, metavar="X",
                   help="fail (writing nothing) when more than this share of the lines cannot be used")


def _seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the keep/drop draws (same file and seed: same output)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curate", help="data curation: filter, ngram-resample, dedup, cot-clean (JSONL in and out)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    f = verbs.add_parser("filter", help="keep records whose judge scores pass thresholds")
    _common(f)
    f.add_argument("--preset", choices=sorted(judge_filter.PRESETS), default=None,
                   help="the paper's rules: caption (vir >= 3, ita >= 3, judge != No), "
                        "video-qa (alignment >= 5, richness >= 5, difficulty >= 3); a score of -1 always drops")
    f.add_argument("--min", action="append", default=[], metavar="FIELD=MIN",
                   help="keep only records with FIELD >= MIN; repeat; replaces the preset's score rules")
    f.add_argument("--reject", action="append", default=[], metavar="FIELD=VALUE",
                   help="drop records whose FIELD is VALUE (case ignored); repeat; replaces the preset's verdict rule")
    f.set_defaults(func=run_filter)

    n = verbs.add_parser("ngram-resample", help="thin records made of over-represented word n-grams")
    _common(n)
    n.add_argument("--max-count", type=int, required=True, metavar="T",
                   help="an n-gram seen c > T times selects a record holding it with probability T/c; a record is "
                        "kept when one of its n-grams selects it")
    n.add_argument("--n", type=int, default=3, help="words per n-gram")
    n.add_argument("--turns", choices=sorted(ngram_resample.TURNS), default="gpt", help="which turns' text to count")
    _seed(n)
    n.set_defaults(func=run_ngram)

    d = verbs.add_parser("dedup", help="keep the first record of each (image content hash, normalised question)")
    _common(d)
    d.add_argument("--image-root", default=None, metavar="DIR",
                   help="directory the image paths are relative to (default: the input file's directory)")
    d.set_defaults(func=run_dedup)

    c = verbs.add_parser("cot-clean", help="LongCoT cleaning: <think>…</think> + \\boxed{}, redundancy, length balance")
    _common(c)
    c.add_argument("--max-overlap", type=float, default=0.8, metavar="X",
                   help="drop a record when more than this share of its thought's words occur in its answer")
    c.add_argument("--bucket-words", type=int, default=256, metavar="N", help="width of the thought-length buckets")
    c.add_argument("--max-bucket-share", type=float, default=0.3, metavar="X",
                   help="cap on the share of kept records in any thought-length bucket (1: no balancing)")
    _seed(c)
    c.set_defaults(func=run_cot)


def _report_path(args: argparse.Namespace) -> str:
    return args.report or f"{args.out}.report.json"


def _done(report, path: str) -> int:
    print(report.summary())
    print(f"wrote {report.output} and {path}")
    return 0


def run_filter(args: argparse.Namespace) -> int:
    rules = judge_filter.build_rules(args.preset, args.min, args.reject)
    path = _report_path(args)
    return _done(judge_filter.filter_file(args.src, args.out, path, rules, args.max_bad_fraction), path)


def run_ngram(args: argparse.Namespace) -> int:
    path = _report_path(args)
    report = ngram_resample.resample_file(args.src, args.out, path, args.max_count, args.n, args.turns, args.seed,
                                          args.max_bad_fraction)
    before, after = report.stats["before"]["entropy_bits"], report.stats["after"]["entropy_bits"]
    print(f"{args.n}-gram entropy {before:.3f} -> {after:.3f} bits")
    return _done(report, path)


def run_dedup(args: argparse.Namespace) -> int:
    path = _report_path(args)
    return _done(dedup.dedup_file(args.src, args.out, path, args.image_root, args.max_bad_fraction), path)


def run_cot(args: argparse.Namespace) -> int:
    path = _report_path(args)
    report = cot_clean.clean_file(args.src, args.out, path, args.max_overlap, args.bucket_words,
                                  args.max_bucket_share, args.seed, args.max_bad_fraction)
    return _done(report, path)
