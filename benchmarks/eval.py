"""Evaluation throughput: items/s of `sail-jax eval`'s generation with batched requests vs one request at a time.

The tiny test checkpoint (tests/data/sailvl2-tiny) on a generated single-image MCQ benchmark, greedy, at most
`--new-tokens` tokens per answer, on whatever device JAX uses here. Each setting is run once untimed first, so the
timed run reuses its compiled programs; prompts are built, tiled and encoded inside the timed loop, as in a real run.
The predictions must agree between the two settings.

    python benchmarks/eval.py [--items 32] [--batch-size 8] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from sail_jax.cli._common import load_engine  # noqa: E402
from sail_jax.evaluation.data import Item  # noqa: E402
from sail_jax.evaluation.runner import EvalSettings, generate_records  # noqa: E402

CKPT = Path(__file__).resolve().parents[1] / "tests" / "data" / "sailvl2-tiny" / "checkpoint"
COLOURS = ("red", "green", "blue", "orange", "purple", "black")


def items(n: int) -> list[Item]:
    out = []
    for i in range(n):
        img = Image.new("RGB", (448, 448), "white")
        ImageDraw.Draw(img).ellipse((100 + i % 50, 100, 300, 340 - i % 40), fill=COLOURS[i % len(COLOURS)])
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        options = {k: COLOURS[(i + j) % len(COLOURS)] for j, k in enumerate("ABCD")}
        out.append(Item(index=str(i), row=i + 1, question="What colour is the shape?", answers=["A"],
                        images=[base64.b64encode(buf.getvalue()).decode()], options=options))
    return out


def run(engine, processor, todo: list[Item], settings: EvalSettings) -> tuple[float, list[str]]:
    records: list[dict] = []
    start = time.perf_counter()
    generate_records(engine, processor, todo, settings, records.append, progress=False)
    seconds = time.perf_counter() - start
    assert all(r["error"] is None for r in records), [r["error"] for r in records if r["error"]]
    return seconds, [r["prediction"] for r in sorted(records, key=lambda r: int(r["index"]))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    engine, processor = load_engine(argparse.Namespace(checkpoint=str(CKPT), tokenizer=None, dtype="float32",
                                                       tensor_parallel=1, decode_steps=8))
    todo = items(args.items)
    results = {}
    for batch in (1, args.batch_size):
        settings = EvalSettings(kind="mcq", dataset="MMStar", max_tiles=1, max_new_tokens=args.new_tokens,
                                batch_size=batch)
        run(engine, processor, todo[:batch], settings)  # compile this batch shape
        results[batch] = run(engine, processor, todo, settings)
    (t1, p1), (tb, pb) = results[1], results[args.batch_size]
    assert p1 == pb, "batched and one-at-a-time predictions differ"
    print(f"device: {jax.devices()[0].platform}; {args.items} items, "
          f"<= {args.new_tokens} new tokens, 2 tiles each")
    print(f"one at a time: {t1:.2f} s, {args.items / t1:.2f} items/s")
    print(f"batch {args.batch_size}: {tb:.2f} s, {args.items / tb:.2f} items/s")
    print(f"speed-up: {t1 / tb:.2f}x (goal >= 3x)")


if __name__ == "__main__":
    main()
