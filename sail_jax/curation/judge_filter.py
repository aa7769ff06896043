"""`curate filter`: keep records whose judge scores (extra top-level fields) pass thresholds.

The paper's rules are the presets: SAIL-Caption2 keeps captions with VIR >= 3 and ITA >= 3 (scores 1-5) that the
Yes-or-No judge did not answer "No"; SAIL-Video keeps QA with alignment >= 5 (-1..10), richness >= 5 (-1..7) and
difficulty >= 3 (-1..8). A score of -1 means the judge refused, and drops the record whatever the threshold. Rules
are checked in order and the first that fails names the drop reason; a missing or non-numeric score also drops.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from sail_jax.curation.stream import Curation, Report

REFUSED = -1


@dataclass(frozen=True)
class MinScore:
    """Keep only when `record[field] >= minimum`."""

    field: str
    minimum: float


@dataclass(frozen=True)
class RejectVerdict:
    """Drop when `record[field]` equals `value` (case and surrounding blanks ignored)."""

    field: str
    value: str


Rule = MinScore | RejectVerdict

PRESETS: dict[str, tuple[Rule, ...]] = {
    "caption": (MinScore("vir", 3), MinScore("ita", 3), RejectVerdict("judge", "No")),
    "video-qa": (MinScore("alignment", 5), MinScore("richness", 5), MinScore("difficulty", 3)),
}


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    """`FIELD=VALUE` of a command-line rule."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ValueError(f"{flag} {text!r}: expected FIELD=VALUE")
    return name.strip(), value.strip()


def build_rules(preset: str | None, minimums: list[str], rejects: list[str]) -> tuple[Rule, ...]:
    """The preset's rules, with its score rules replaced by `minimums` (`FIELD=MIN`) and its verdict rules by
    `rejects` (`FIELD=VALUE`) when those are given."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    base = PRESETS.get(preset, ())
    scores = [r for r in base if isinstance(r, MinScore)]
    verdicts = [r for r in base if isinstance(r, RejectVerdict)]
    if minimums:
        scores = []
        for text in minimums:
            name, value = parse_assignment(text, "--min")
            try:
                scores.append(MinScore(name, float(value)))
            except ValueError:
                raise ValueError(f"--min {text!r}: {value!r} is not a number") from None
    if rejects:
        verdicts = [RejectVerdict(*parse_assignment(text, "--reject")) for text in rejects]
    rules = (*scores, *verdicts)
    if not rules:
        raise ValueError("no rule to filter by: give --preset caption|video-qa, or --min / --reject")
    return rules


def _score(value: Any) -> float | None:
    """A judge score as a finite number (numeric strings accepted, as judges often answer in text), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        score = float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        return None
    return score if math.isfinite(score) else None


def failed_rule(obj: dict[str, Any], rules: tuple[Rule, ...]) -> str | None:
    """The drop reason of the first rule `obj` fails, or None when it passes them all."""
    for rule in rules:
        if rule.field not in obj:
            return f"{rule.field} missing"
        value = obj[rule.field]
        if isinstance(rule, RejectVerdict):
            if str(value).strip().casefold() == rule.value.casefold():
                return f"{rule.field} = {rule.value}"
            continue
        score = _score(value)
        if score is None:
            return f"{rule.field} not a number"
        if score == REFUSED:
            return f"{rule.field} refused (-1)"
        if score < rule.minimum:
            return f"{rule.field} < {rule.minimum:g}"
    return None


def filter_file(src: str | os.PathLike, out: str | os.PathLike, report: str | os.PathLike,
                rules: tuple[Rule, ...], max_bad_fraction: float = 0.05) -> Report:
    """Write the records of `src` that pass `rules` to `out`; returns the report (also written to `report`)."""
    params = {"rules": [f"{r.field} >= {r.minimum:g}" if isinstance(r, MinScore) else f"{r.field} != {r.value}"
                        for r in rules]}
    with Curation("filter", src, out, report, params, max_bad_fraction=max_bad_fraction) as run:
        for record in run.records():
            reason = failed_rule(record.obj, rules)
            if reason is None:
                run.keep(record.obj)
            else:
                run.drop(reason)
    return run.report
