"""Answer extraction and scoring for VLMEvalKit-style benchmarks; pure Python, usable without a model.

- MCQ: the option letter is read from the prediction ("B", "B.", "(B)", "The answer is B", a lone letter among
  words, or else the one option whose text the prediction contains), VLMEvalKit's exact-matching stage made a little
  more robust; no LLM judge.
- VQA: normalised exact match against any acceptable answer (lowercase, punctuation and articles dropped, number
  words as digits, thousands separators removed), as the VQA evaluation normalises.
- OCR: OCRBench's containment rule (an answer, lowercased and stripped, is a substring of the lowercased
  prediction; handwritten-formula items compare with all spaces removed and case kept).
- Y/N: VLMEvalKit's yes/no extraction (exactly one of the words "yes"/"no").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

KINDS = ("mcq", "vqa", "ocr", "yn")
HME_CATEGORY = "Handwritten Mathematical Expression Recognition"

_TO_SPACE = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_LEADING = re.compile(r"^\(?([A-Z])(?:[.):：]|\s*$)")
_STATED = re.compile(r"(?i:answer)(?:\s+is)?\s*[:：]?\s*\(?([A-Z])\)?(?![A-Za-z])")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
}
_ARTICLES = {"a", "an", "the"}


def extract_choice(prediction: str, options: Mapping[str, Any]) -> str | None:
    """The option letter a prediction names, or None when it names none or several."""
    text = prediction.strip()
    for pattern in (_LEADING, _STATED):
        m = pattern.search(text)
        if m and m.group(1) in options:
            return m.group(1)
    letters = {t for t in text.translate(_TO_SPACE).split() if t in options}
    if len(letters) == 1:
        return letters.pop()
    low = text.lower()
    hits = {k: str(v).strip().lower() for k, v in options.items() if str(v).strip() and str(v).strip().lower() in low}
    if len(hits) == 1:
        return next(iter(hits))
    # several option texts occur: accept the longest when it contains every other one ("dark red" vs "red")
    if hits:
        best = max(hits, key=lambda k: len(hits[k]))
        if all(v in hits[best] for v in hits.values()):
            return best
    return None


def normalize_answer(text: str) -> str:
    """VQA-style normalisation for exact matching."""
    t = text.lower().replace("\n", " ").replace("\t", " ").strip()
    t = re.sub(r"(?<=\d),(?=\d)", "", t)  # 1,000 -> 1000
    t = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", t)  # periods, but not decimal points
    t = t.replace("'", "").replace("’", "")  # don't -> dont
    t = re.sub(r"[^\w\s.]|_", " ", t)
    return " ".join(_NUMBER_WORDS.get(w, w) for w in t.split() if w not in _ARTICLES)


def vqa_match(prediction: str, answers: Sequence[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def ocr_match(prediction: str, answers: Sequence[str], category: str | None = None) -> bool:
    """OCRBench: some acceptable answer is contained in the prediction."""
    if category == HME_CATEGORY:
        squash = lambda s: s.strip().replace("\n", " ").replace(" ", "")
        pred = squash(prediction)
        return any(squash(a) and squash(a) in pred for a in answers)
    squash = lambda s: s.lower().strip().replace("\n", " ")
    pred = squash(prediction)
    return any(squash(a) and squash(a) in pred for a in answers)


def extract_yes_no(prediction: str) -> str | None:
    words = set(re.findall(r"[a-z]+", prediction.lower()))
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return None


def score_item(kind: str, prediction: str, answers: Sequence[str], options: Mapping[str, Any] | None = None,
               category: str | None = None) -> tuple[bool, str | None]:
    """(correct, what was extracted) for one prediction; `answers` are the acceptable answers."""
    if kind == "mcq":
        choice = extract_choice(prediction, options or {})
        return choice is not None and choice in {a.strip().upper() for a in answers}, choice
    if kind == "vqa":
        return vqa_match(prediction, answers), normalize_answer(prediction)
    if kind == "ocr":
        return ocr_match(prediction, answers, category), None
    if kind == "yn":
        said = extract_yes_no(prediction)
        return said is not None and said in {a.strip().capitalize() for a in answers}, said
    raise ValueError(f"unknown evaluation kind {kind!r}; expected one of {KINDS}")


def summarize(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy overall and per category from items with "correct" and optional "category"."""
    total = correct = 0
    per: dict[str, list[int]] = {}
    for item in items:
        ok = bool(item["correct"])
        total += 1
        correct += ok
        cat = item.get("category")
        if cat is not None:
            per.setdefault(str(cat), [0, 0])
            per[str(cat)][0] += 1
            per[str(cat)][1] += ok
    return {
        "n": total,
        "correct": correct,
        "accuracy": correct / total if total else 0.0,
        "per_category": {k: {"n": n, "correct": c, "accuracy": c / n} for k, (n, c) in sorted(per.items())},
    }
