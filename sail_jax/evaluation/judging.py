"""LLM-judged benchmarks (MM-Vet, MathVista free-form) through the RL judge (a callable or an HTTP endpoint).

Each benchmark's judge prompt is one file, `assets/judge_prompts/{metric}.txt`, with `{question}`, `{answer}` and
`{prediction}` filled in per item. The judge is called as `judge(question=filled prompt, response=prediction,
answer=ground truth)` and returns a score in [0, 1], written to the row's `score` column for the metric. A judge call
that fails scores 0 (the RL judge's rule) and is reported as that row's error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from sail_jax.evaluation.extraction import mathvista_hit
from sail_jax.evaluation.metrics import prediction_of
from sail_jax.resources import JUDGE_PROMPTS_DIR
from sail_jax.rl.judge import Judge

JUDGED = ("mmvet", "mathvista")  # metrics with a judge prompt
NEEDS_JUDGE = frozenset({"mmvet"})  # metrics that cannot be computed without one
_FIELD = re.compile(r"\{(question|answer|prediction)\}")


def judge_prompt(metric: str, row: Mapping[str, Any]) -> str:
    """The benchmark's judge prompt filled in with the row (one pass, so a field's text is never re-substituted)."""
    if metric not in JUDGED:
        raise ValueError(f"metric {metric!r} has no judge prompt; judged metrics: {', '.join(JUDGED)}")
    answer = str(row.get("answer", ""))
    if metric == "mmvet":  # MM-Vet spaces its <AND> / <OR> answer connectives
        answer = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    fields = {"question": str(row.get("question", "")), "answer": answer, "prediction": prediction_of(row)}
    template = (JUDGE_PROMPTS_DIR / f"{metric}.txt").read_text(encoding="utf-8")
    return _FIELD.sub(lambda m: fields[m.group(1)], template)


def judge_rows(judge: Judge, metric: str, rows: Sequence[MutableMapping[str, Any]]) -> list[str | None]:
    """Set each judged row's `score`; returns per row the error of a failed judge call (else None). MathVista rows the
    rule-based extraction already gets right are not sent."""
    errors: list[str | None] = []
    for i, row in enumerate(rows):
        if metric == "mathvista" and mathvista_hit(row, i):
            errors.append(None)
            continue
        failures = judge.failures
        row["score"] = judge(judge_prompt(metric, row), prediction_of(row), str(row.get("answer", "")))
        errors.append(f"judge {judge.name} failed; scored 0" if judge.failures > failures else None)
    return errors
