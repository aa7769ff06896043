"""MMMU and MathVista answer extraction by their rules (no LLM judge) and their scores; pure Python, no model.

Rows are VLMEvalKit prediction rows as in `metrics.py`. MMMU rows with option columns are multiple choice, the others
open questions; MathVista rows carry `question_type`, `answer_type`, `choices`, optional `precision`, `task`, `skills`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sail_jax.evaluation.metrics import (
    Row,
    answers_of,
    is_blank,
    list_cell,
    options_of,
    percent,
    percent_by,
    prediction_of,
    report,
    required_field,
)
from sail_jax.evaluation.scoring import extract_choice

# ---------------------------------------------------------------------------------------------------- MMMU

_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL_TAILS = frozenset(":,.!?;'")
_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_PLAIN = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def mmmu_parse_choice(response: str, options: Mapping[str, str]) -> str | None:
    """MMMU's rule-based multiple-choice parse: "(B)" marks, else a lone "B", else (in answers over five words) option
    texts; among several candidates the one mentioned last wins. None when nothing is found (MMMU picks at random)."""
    for ch in ",.!?;:'":
        response = response.strip(ch)
    text = f" {response} "
    patterns = [(lambda k: f"({k})", text), (lambda k: f" {k} ", text)]
    if len(text.split()) > 5:
        patterns.append((lambda k: str(options[k]).lower(), text.lower()))
    for pattern, haystack in patterns:
        found = [k for k in options if pattern(k) in haystack]
        if found:
            return max(found, key=lambda k: haystack.rfind(pattern(k)))
    return None


def _mmmu_normalize(text: str) -> list[str | float]:
    """A number (commas dropped, rounded to 2 decimals) or lowercased text; one letter padded with a space on either
    side so it does not match inside words."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def mmmu_parse_open(response: str) -> list[str | float]:
    """MMMU's rule-based open-answer parse: per line, the shortest tail after an indicator ("is ", "so ", "answer ",
    "therefore ", …, and "=" on the last line), or the whole response; plus every number in those tails; normalised.

    MMMU also splits sentences at ". " before a capital, after lower-casing, so that split never fires; lines only.
    """
    text = response.strip().strip(".").lower()
    lines = text.split("\n")
    tails = []
    for n, line in enumerate(lines):
        indicators = _KEY_INDICATORS + (("=",) if n == len(lines) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL_TAILS:
            tails.append(shortest)
    if not tails:
        tails = [text]
    found = list(tails)
    for tail in tails:
        found += _NUMBER_WITH_COMMAS.findall(tail) + _NUMBER_SCIENTIFIC.findall(tail) + _NUMBER_PLAIN.findall(tail)
    return list(dict.fromkeys(v for s in found for v in _mmmu_normalize(s)))


def mmmu_open_match(parsed: Sequence[str | float], answers: Sequence[str]) -> bool:
    """A parsed number equals a numeric answer, or a normalised text answer occurs inside a parsed string."""
    gold = [v for a in answers for v in _mmmu_normalize(a)]
    return any(any(isinstance(g, str) and g in p for g in gold) if isinstance(p, str) else p in gold for p in parsed)


def mmmu_hit(row: Row, i: int = 0) -> tuple[bool, Any]:
    """(correct, parsed): rows with option columns are multiple choice (answer letter), the others open questions."""
    options = options_of(row)
    answers = answers_of(row, i)
    if options:
        choice = mmmu_parse_choice(prediction_of(row), options)
        return choice is not None and choice in {a.strip() for a in answers}, choice
    parsed = mmmu_parse_open(prediction_of(row))
    return mmmu_open_match(parsed, answers), parsed


def mmmu(rows: Iterable[Row]) -> dict[str, Any]:
    """MMMU with rule-based parsing: percent correct, overall, per category (subject) and l2-category."""
    rows = list(rows)
    return report(rows, [float(mmmu_hit(r, i)[0]) for i, r in enumerate(rows)])


# ---------------------------------------------------------------------------------------------------- MathVista

_QUOTED_ANSWER = re.compile(r'The answer is "(.*)"\.')
_ANY_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def _mathvista_precision(row: Row) -> int:
    """Decimal places of a float answer: the `precision` column, else the digits after the answer's point."""
    if not is_blank(row.get("precision")):
        return int(float(row["precision"]))
    answer = str(row.get("answer", ""))
    return len(answer.split(".")[1]) if "." in answer else 0


def mathvista_extract(row: Row, i: int = 0) -> str | None:
    """MathVista's rule-based extraction and normalisation (no LLM), ready to compare with the `answer` string.

    multi_choice: the response that is a choice text, else the option letter it names (read as VLMEvalKit's
    exact-matching step does) as that choice's text. integer / float: the whole response if it is a number, else
    MathVista's quick rule `The answer is "X".`, else the last number in the response (where MathVista asks its LLM);
    then int(float(x)), or round(float(x), precision). Other types: quick rule, else the stripped response.
    """
    response = prediction_of(row).strip()
    if not response:
        return None
    if row.get("question_type") == "multi_choice":
        choices = list_cell(required_field(row, "choices", i))
        if response in choices:
            return response
        letter = extract_choice(response, {chr(ord("A") + k): c for k, c in enumerate(choices)})
        return None if letter is None else choices[ord(letter) - ord("A")]
    quoted = _QUOTED_ANSWER.search(response)
    answer_type = row.get("answer_type")
    if answer_type not in ("integer", "float"):
        return quoted.group(1) if quoted else response
    candidates = [response] + ([quoted.group(1)] if quoted else []) + _ANY_NUMBER.findall(response)[-1:]
    for candidate in candidates:
        try:
            value = float(candidate.replace(",", ""))
            return str(int(value)) if answer_type == "integer" else str(round(value, _mathvista_precision(row)))
        except (ValueError, OverflowError):
            continue
    return None


def mathvista_hit(row: Row, i: int = 0) -> bool:
    """The rule-based extraction equals the answer."""
    return mathvista_extract(row, i) == str(required_field(row, "answer", i)).strip()


def mathvista(rows: Iterable[Row]) -> dict[str, Any]:
    """MathVista: percent correct, overall, per `task` and per skill (VLMEvalKit's report). An item is right when the
    rule-based extraction matches; otherwise an LLM judge's `score` column counts where the rows carry one (VLMEvalKit
    also asks its judge only when the rules fail)."""
    rows = list(rows)
    hits = [1.0 if mathvista_hit(r, i) else 0.0 if is_blank(r.get("score")) else float(r["score"])
            for i, r in enumerate(rows)]
    out: dict[str, Any] = {"n": len(hits), "overall": percent(hits)}
    tasks = [(r["task"], h) for r, h in zip(rows, hits) if not is_blank(r.get("task"))]
    skills = [(s, h) for r, h in zip(rows, hits) if not is_blank(r.get("skills")) for s in list_cell(r["skills"])]
    if tasks:
        out["per_task"] = percent_by(tasks)
    if skills:
        out["per_skill"] = percent_by(skills)
    return out
