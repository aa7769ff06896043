"""`sail-jax soup`: average homogeneous checkpoints (model soup), with given weights or greedily on held-out data.

    sail-jax soup --checkpoint A --checkpoint B --checkpoint C --weights 0.5,0.3,0.2 --out SOUP
    sail-jax soup --checkpoint A --checkpoint B --checkpoint C --greedy --eval-data val.tsv --kind mcq --out SOUP

Greedy soup: the candidates are scored alone on the held-out TSV and taken best first; each is added to the soup
(a uniform average) only if the soup's score does not drop. Scoring is `sail-jax eval`'s runner.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from sail_jax.cli._common import checkpoint_arg
from sail_jax.evaluation.scoring import KINDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soup", help="weighted average of homogeneous checkpoints (model soup)")
    p.add_argument("--checkpoint", action="append", required=True, type=checkpoint_arg,
                   help="input checkpoint directory (ours or upstream) or training workdir (its newest step); "
                        "repeat, at least twice")
    p.add_argument("--weights", default=None, help="comma-separated positive weights, one per --checkpoint "
                   "(normalised to sum 1; default uniform)")
    p.add_argument("--out", required=True, help="destination directory (written atomically, in the inputs' format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("greedy soup")
    g.add_argument("--greedy", action="store_true", help="add candidates best first while the held-out score holds")
    g.add_argument("--eval-data", default=None, help="held-out .tsv (VLMEvalKit layout) scoring the candidates")
    g.add_argument("--kind", choices=KINDS, default=None, help="how answers are extracted and scored")
    g.add_argument("--dataset-name", default=None, help="VLMEvalKit dataset name (default: the file stem)")
    g.add_argument("--max-tiles", type=int, default=None, help="override the per-dataset tile limit")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="answer length cap while scoring")
    g.add_argument("--batch-size", type=int, default=8, help="held-out rows generated together")
    g.add_argument("--tokenizer", default=None, help="tokenizer/processor directory (default: the first checkpoint)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="evaluation dtype")
    p.set_defaults(func=run)


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.5,0.3,0.2") from None


def greedy_select(
    candidates: Sequence[str], score: Callable[[Sequence[str]], float]
) -> tuple[list[str], list[tuple[str, float, float | None, bool]]]:
    """(ingredients, table rows). `score(subset)` scores the uniform soup of `subset` (one candidate: itself).

    Rows, best candidate first: (candidate, its score alone, the soup's score with it added, kept). The best
    candidate starts the soup; each next one is kept if the soup's score does not drop.
    """
    alone = {c: score([c]) for c in candidates}
    order = sorted(candidates, key=lambda c: -alone[c])  # stable: ties keep the command-line order
    soup, best = [order[0]], alone[order[0]]
    rows: list[tuple[str, float, float | None, bool]] = [(order[0], best, best, True)]
    for c in order[1:]:
        trial = score([*soup, c])
        kept = trial >= best
        if kept:
            soup, best = [*soup, c], trial
        rows.append((c, alone[c], trial, kept))
    return soup, rows


def format_table(rows: Sequence[tuple[str, float, float | None, bool]]) -> str:
    width = max(len("candidate"), *(len(r[0]) for r in rows))
    lines = [f"{'candidate':<{width}}  {'alone':>7}  {'soup':>7}  kept"]
    for name, alone, soup, kept in rows:
        lines.append(f"{name:<{width}}  {alone:7.4f}  {soup:7.4f}  {'yes' if kept else 'no'}")
    return "\n".join(lines)


def _scorer(args: argparse.Namespace, scratch: Path) -> Callable[[Sequence[str]], float]:
    """Held-out accuracy of a candidate or of the uniform soup of several (written under `scratch` to be loaded
    exactly as `sail-jax eval` loads a checkpoint)."""
    from converters.soup import make_soup
    from sail_jax.cli._common import load_engine
    from sail_jax.evaluation.data import read_tsv
    from sail_jax.evaluation.runner import EvalSettings, evaluate

    settings = EvalSettings(kind=args.kind, dataset=args.dataset_name or Path(args.eval_data).stem,
                            max_tiles=args.max_tiles, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    items = read_tsv(args.eval_data)
    tokenizer = args.tokenizer or args.checkpoint[0]

    def score(subset: Sequence[str]) -> float:
        path = subset[0]
        if len(subset) > 1:
            path = str(scratch / "soup")
            make_soup(subset, path, overwrite=True, progress=False)
        model_args = argparse.Namespace(checkpoint=path, tokenizer=tokenizer, dtype=args.dtype, tensor_parallel=1,
                                        decode_steps=8)
        engine, processor = load_engine(model_args)
        result, _ = evaluate(engine, processor, items, settings, source=args.eval_data, progress=False)
        return result["accuracy"]

    return score


def run(args: argparse.Namespace) -> int:
    from converters.soup import check_destination, check_homogeneous, make_soup, open_ingredient
    from sail_jax.files import as_path, is_url

    weights = parse_weights(args.weights)
    checkpoints = list(args.checkpoint)
    if not args.greedy:
        if args.eval_data or args.kind:
            raise ValueError("--eval-data / --kind only apply with --greedy")
        note = make_soup(checkpoints, args.out, weights, overwrite=args.overwrite, progress=not args.no_progress)
        if note:
            print(f"note: {note}")
        print(f"wrote {args.out}: soup of {len(checkpoints)} checkpoints")
        return 0
    if weights is not None:
        raise ValueError("--weights and --greedy are exclusive (a greedy soup averages its ingredients uniformly)")
    if not (args.eval_data and args.kind):
        raise ValueError("--greedy needs --eval-data and --kind")
    if len(checkpoints) < 2:
        raise ValueError(f"a soup needs at least 2 checkpoints, got {len(checkpoints)}")
    if not as_path(args.eval_data).is_file():
        raise FileNotFoundError(f"{args.eval_data}: no such file")
    check_destination(args.out, args.overwrite, checkpoints)  # refused before any evaluation, not after
    check_homogeneous([open_ingredient(c) for c in checkpoints])
    if is_url(args.out):  # the trial soups are scored from local disk
        scratch = Path(tempfile.mkdtemp(prefix="sail-jax-greedy-"))
    else:
        out = Path(args.out).absolute()
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.greedy-", dir=out.parent))  # private, removed below
    try:
        soup, rows = greedy_select(checkpoints, _scorer(args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(format_table(rows))
    if len(soup) == 1:  # nothing improved on the best candidate: the "soup" is that checkpoint, bit for bit
        soup = soup * 2
    make_soup(soup, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {args.out}: greedy soup of {len(set(soup))} of {len(checkpoints)} checkpoints")
    return 0
