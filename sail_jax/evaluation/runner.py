"""Run a benchmark: VLMEvalKit prompts -> greedy batched generation -> answer extraction -> accuracy and the
benchmark's own metric.

One bad row does not end a run: an item whose image, encoding or generation fails gets an `error` (and an empty
prediction, scored wrong) and the others go on; a batch whose generation fails is retried one request at a time, so
only the bad request fails. Finished items go to a `PredictionLog` as they finish, so a rerun resumes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sail_jax.data.processor import SailProcessor
from sail_jax.evaluation.data import Item, build_prompt, decode_images, encode_video_item, postprocess, tiling
from sail_jax.evaluation.datasets import METRICS, compute
from sail_jax.evaluation.judging import NEEDS_JUDGE, judge_rows
from sail_jax.evaluation.predictions import PredictionLog, prediction_rows
from sail_jax.evaluation.scoring import KINDS, score_item, summarize
from sail_jax.inference.engine import Completion, Engine, Request
from sail_jax.inference.sampling import SamplingParams
from sail_jax.inference.text import decode_response
from sail_jax.inference.thinking import extract_answer, split_thinking
from sail_jax.rl.judge import Judge


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    kind: str
    dataset: str | None = None
    max_tiles: int | None = None
    thinking: bool = False
    max_new_tokens: int = 1024
    batch_size: int = 8
    metric: str | None = None  # the benchmark's metric (datasets.METRICS), beside plain accuracy

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown evaluation kind {self.kind!r}; expected one of {KINDS}")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {', '.join(METRICS)}")
        if self.max_new_tokens < 1:  # an empty answer scores nothing: refuse rather than run a useless evaluation
            raise ValueError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
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


def generate_each(engine: Engine, requests: Sequence[Request], sampling: SamplingParams) -> list[
        Completion | Exception]:
    """Generate for all requests together; if that fails, for each alone, so a bad request fails only itself."""
    try:
        return engine.generate(requests, sampling)
    except Exception as e:  # any failure: isolate it to its request (see the module docstring)
        if len(requests) == 1:
            return [e]
    out: list[Completion | Exception] = []
    for request in requests:
        try:
            out += engine.generate([request], sampling)
        except Exception as e:  # this request's failure, recorded for it alone
            out.append(e)
    return out


def describe(error: Exception) -> str:
    """A row's error: our input errors' own one line (it names the file and row), else the exception's type too."""
    if isinstance(error, (ValueError, FileNotFoundError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def encode_batch(processor: SailProcessor, batch: Sequence[Item], settings: EvalSettings,
                 source: str | Path = "") -> list[tuple[Item, str, dict] | tuple[Item, Exception]]:
    """Each item's (item, prompt, processor output), or (item, error) when its image or prompt fails."""
    out: list[tuple[Item, str, dict] | tuple[Item, Exception]] = []
    for item in batch:
        try:
            out.append((item, *encode_item(processor, item, settings, source)))
        except Exception as e:  # a bad image or prompt fails its row only
            out.append((item, e))
    return out


def generate_records(engine: Engine, processor: SailProcessor, items: Sequence[Item], settings: EvalSettings,
                     on_record: Callable[[dict[str, Any]], None], source: str | Path = "",
                     progress: bool = True) -> None:
    """Generate greedily for `items`, `settings.batch_size` at a time; each item's record goes to `on_record` as soon
    as its batch finishes: index, prompt, tiles, response, prediction and error (None, or why the row failed).

    The next batch is decoded, tiled and tokenized on a second thread while the device generates for this one
    (image decoding, tokenization and the device all release the GIL), so host work does not add to device time."""
    sampling = SamplingParams(max_new_tokens=settings.max_new_tokens)
    bar = tqdm(total=len(items), desc=f"eval {settings.dataset or settings.kind}", unit="item", disable=not progress)
    batches = [items[s:s + settings.batch_size] for s in range(0, len(items), settings.batch_size)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(encode_batch, processor, batches[0], settings, source) if batches else None
        for k in range(len(batches)):
            encoded = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(encode_batch, processor, batches[k + 1], settings, source)
            ok = [e for e in encoded if len(e) == 3]
            for item, error in (e for e in encoded if len(e) == 2):
                on_record({"index": item.index, "prompt": None, "tiles": [], "response": None, "prediction": "",
                           "error": describe(error)})
            requests = [Request.from_encoding(enc) for _, _, enc in ok]
            outputs = generate_each(engine, requests, sampling) if requests else []
            for (item, prompt, enc), out in zip(ok, outputs):
                record = {"index": item.index, "prompt": prompt,
                          "tiles": [int(t) for t in enc.get("num_patches_list", ())]}
                if isinstance(out, Exception):
                    record.update(response=None, prediction="", error=describe(out))
                else:
                    text = decode_response(processor.tokenizer, out.token_ids)
                    record.update(response=text, prediction=final_answer(text, settings), error=None)
                on_record(record)
            bar.update(len(batches[k]))
    bar.close()


def score_records(items: Sequence[Item], records: dict[str, dict[str, Any]], settings: EvalSettings,
                  judge: Judge | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(report, VLMEvalKit prediction rows) from every item's record: per-item correctness and accuracy, and the
    benchmark metric (judged first where it needs a judge); a failed row has an empty prediction."""
    if settings.metric in NEEDS_JUDGE and judge is None:
        raise ValueError(f"{settings.metric} is scored by an LLM judge: give a judge")
    chosen = [records[item.index] for item in items]
    errors = [r["error"] for r in chosen]
    rows = prediction_rows(items, [r["prediction"] for r in chosen])
    if judge is not None and settings.metric is not None:
        generated = [i for i, e in enumerate(errors) if e is None]  # a failed row scores 0 without a judge call
        for i, e in enumerate(errors):
            if e is not None:
                rows[i]["score"] = 0.0
        for i, error in zip(generated, judge_rows(judge, settings.metric, [rows[i] for i in generated])):
            errors[i] = error
    if any(e is not None for e in errors):
        for row, error in zip(rows, errors):
            row["error"] = error or ""
    out_items = []
    for item, record, error in zip(items, chosen, errors):
        correct, extracted = score_item(settings.kind, record["prediction"], item.answers, item.options,
                                        item.category)
        out_items.append({
            **{k: record[k] for k in ("index", "prompt", "tiles", "response", "prediction")},
            "category": item.category, "extracted": extracted,
            "answer": item.answers if len(item.answers) > 1 else item.answers[0], "correct": correct,
            "error": error,
        })
    report = {"dataset": settings.dataset, "kind": settings.kind, "thinking": settings.thinking,
              "max_tiles": settings.max_tiles, **summarize(out_items), "metric": settings.metric,
              "scores": compute(settings.metric, rows) if settings.metric else None,
              "failed": sum(e is not None for e in errors)}
    if judge is not None:
        report["judge"] = {"name": judge.name, "calls": judge.calls, "failures": judge.failures}
    return {**report, "items": out_items}, rows


def check_indices(items: Sequence[Item], source: str | Path = "") -> None:
    """Indices key the prediction log and VLMEvalKit's files: two rows may not share one."""
    seen: dict[str, int] = {}
    for item in items:
        if item.index in seen:
            raise ValueError(f"{source}: rows {seen[item.index]} and {item.row} share index {item.index!r}")
        seen[item.index] = item.row


def evaluate(engine: Engine, processor: SailProcessor, items: Sequence[Item], settings: EvalSettings,
             source: str | Path = "", progress: bool = True, log: PredictionLog | None = None,
             judge: Judge | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate for every item not already done in `log` (appending each record to it), then score all of them;
    returns the report (summary, metric scores, per-item records) and the VLMEvalKit prediction rows."""
    check_indices(items, source)
    records = dict(log.done) if log is not None else {}

    def keep(record: dict[str, Any]) -> None:
        records[record["index"]] = record
        if log is not None:
            log.append(record)

    todo = [item for item in items if item.index not in records]
    if todo:
        generate_records(engine, processor, todo, settings, keep, source, progress)
    return score_records(items, records, settings, judge)
