"""Short-answer QA from a JSONL file (`{"id", "image": [paths], "question", "answer", "type"}` per line, as
`sail-jax make-demo-data` writes `heldout_eval.jsonl`): greedy answers scored by normalised exact match."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sail_jax.data.processor import SailProcessor
from sail_jax.evaluation.scoring import score_item, summarize
from sail_jax.inference.engine import Engine, Request
from sail_jax.inference.sampling import SamplingParams
from sail_jax.inference.text import decode_response
from sail_jax.jsonl import iter_jsonl


def read_qa_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows with image paths made absolute (relative to the file); errors name the file and line."""
    path = Path(path)
    rows = []
    for n, row in iter_jsonl(path):
        missing = [k for k in ("question", "answer") if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: missing key(s) {missing}")
        images = row.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        rows.append({**row, "image": [str(path.parent / p) for p in images], "line": n})
    return rows


def evaluate_qa(
    engine: Engine, processor: SailProcessor, rows: Sequence[dict[str, Any]], batch_size: int = 16,
    max_new_tokens: int = 8,
) -> dict[str, Any]:
    """Accuracy overall and per `type`, and every prediction."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    records = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        encoded = [processor(images=r["image"], prompt=r["question"]) for r in batch]
        requests = [Request(e["input_ids"][0], e["pixel_values"] if len(e["pixel_values"]) else None)
                    for e in encoded]
        for row, out in zip(batch, engine.generate(requests, sampling), strict=True):
            prediction = decode_response(processor.tokenizer, out.token_ids)
            correct, _ = score_item("vqa", prediction, [str(row["answer"])])
            records.append({"id": row.get("id"), "category": row.get("type"), "question": row["question"],
                            "answer": row["answer"], "prediction": prediction, "correct": correct})
    return {**summarize(records), "items": records}
