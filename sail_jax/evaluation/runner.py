"""Run a benchmark: VLMEvalKit prompts -> greedy batched generation -> answer extraction -> accuracy report."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sail_jax.data.processor import SailProcessor
from sail_jax.evaluation.data import Item, build_prompt, decode_images, encode_video_item, postprocess, tiling
from sail_jax.evaluation.scoring import KINDS, score_item, summarize
from sail_jax.inference.engine import Engine, Request
from sail_jax.inference.sampling import SamplingParams
from sail_jax.inference.text import decode_response
from sail_jax.inference.thinking import extract_answer, split_thinking


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    kind: str
    dataset: str | None = None
    max_tiles: int | None = None
    thinking: bool = False
    max_new_tokens: int = 1024
    batch_size: int = 8

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown evaluation kind {self.kind!r}; expected one of {KINDS}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ValueError(f"max tiles must be >= 1, got {self.max_tiles}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")


def encode_item(processor: SailProcessor, item: Item, settings: EvalSettings, source: str | Path = "") -> tuple[
        str, dict]:
    """(user prompt with placeholders, processor output) for one row, tiled as VLMEvalKit tiles it."""
    if item.video is not None:
        return encode_video_item(processor, item, settings.kind, settings.dataset, settings.thinking, source)
    prompt = build_prompt(item, settings.kind, settings.dataset, settings.thinking)
    images = decode_images(item, source)
    max_num, msac = tiling(len(images), settings.dataset, settings.max_tiles)
    proc = dataclasses.replace(processor, max_num=max_num, msac=msac)
    enc = proc.encode_conversation([{"role": "user", "content": prompt}], images, add_generation_prompt=True)
    return prompt, enc


def final_answer(text: str, settings: EvalSettings) -> str:
    """What gets scored: in thinking mode the boxed answer (VLMEvalKit's rule) or else the text after `</think>`;
    ChartQA / OCRVQA drop a trailing '.'."""
    if settings.thinking:
        boxed = extract_answer(text)
        text = boxed if boxed is not None else split_thinking(text)[1]
    return postprocess(text, settings.dataset)


def evaluate(engine: Engine, processor: SailProcessor, items: Sequence[Item], settings: EvalSettings,
             source: str | Path = "", progress: bool = True) -> dict[str, Any]:
    """Generate greedily for every item and score it; returns the summary plus per-item records."""
    sampling = SamplingParams(max_new_tokens=settings.max_new_tokens)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(items), desc=f"eval {settings.dataset or settings.kind}", unit="item", disable=not progress)
    for start in range(0, len(items), settings.batch_size):
        batch = items[start:start + settings.batch_size]
        encoded = [encode_item(processor, item, settings, source) for item in batch]
        requests = [Request(enc["input_ids"], enc["pixel_values"] if len(enc["pixel_values"]) else None)
                    for _, enc in encoded]
        for item, (prompt, enc), out in zip(batch, encoded, engine.generate(requests, sampling)):
            text = decode_response(processor.tokenizer, out.token_ids)
            prediction = final_answer(text, settings)
            correct, extracted = score_item(settings.kind, prediction, item.answers, item.options, item.category)
            records.append({
                "index": item.index, "category": item.category, "prompt": prompt,
                "tiles": [int(t) for t in enc["num_patches_list"]], "response": text, "prediction": prediction,
                "extracted": extracted, "answer": item.answers if len(item.answers) > 1 else item.answers[0],
                "correct": correct,
            })
        bar.update(len(batch))
    bar.close()
    summary = summarize(records)
    return {"dataset": settings.dataset, "kind": settings.kind, "thinking": settings.thinking,
            "max_tiles": settings.max_tiles, **summary, "items": records}
