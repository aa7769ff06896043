"""Verifiable rewards for RL: answer correctness by prompt kind, the think/answer format reward, the mixed reward.

A response is `<think>reasoning</think>answer`; the answer is read from its last `\\boxed{...}` (the final one is the
model's final answer), or, without a box, from the text after `</think>`. Text is NFKC-normalised first, so
full-width digits and letters (common in Chinese output) and the unicode minus compare like their ASCII forms.
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("math", "mcq", "count", "open")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THINK = re.compile(r"\s*<think>(.*?)</think>(.*)", re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LETTER_ALONE = re.compile(r"\(([A-Z])\)|([A-Z])(?:[.:、)]|$)")
_LETTER_CUE = re.compile(r"(?:answer|option|choice|答案|选项|选)\s*(?:is|是|为|:)?\s*\(?([A-Z])\)?(?![A-Za-z])", re.I)


def normalize(text: str) -> str:
    """NFKC (full-width forms to ASCII), unicode minus to '-', outer whitespace and a final period removed."""
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-").strip()
    return text[:-1].rstrip() if text.endswith((".", "。")) else text


def extract_boxed(text: str) -> str | None:
    """Content of the LAST `\\boxed{...}` (or `\\fbox{...}`) with nested and escaped braces, or None when there is
    no box or the last one is unclosed (a truncated response has no final answer)."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # an escaped character (e.g. \{ in a set) never opens or closes the box
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return text[starts[-1]:i].strip()
        i += 1
    return None


def final_answer(response: str) -> str:
    """The answer part of a response: its last boxed content, else the text after the last `</think>`."""
    boxed = extract_boxed(response)
    if boxed is not None:
        return normalize(boxed)
    return normalize(response.rsplit("</think>", 1)[-1])


def math_equal(pred: str, gold: str) -> bool:
    """Mathematical equivalence by math-verify (1/2 = 0.5, x = 3 vs 3, sets, intervals), falling back to equal
    normalised text for answers it cannot parse (words, Chinese)."""
    from math_verify import parse, verify

    pred, gold = normalize(pred), normalize(gold)
    if not pred:
        return False
    # math-verify's timeouts use SIGALRM, which only the main thread may set; elsewhere run without them.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"${gold}$", parsing_timeout=limit)
    pred_parsed = parse(f"${pred}$", parsing_timeout=limit)
    if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=limit):
        return True
    return pred == gold


def option_letter(text: str) -> str | None:
    """The option letter an answer names: "B", "(B) text", "B. text", "the answer is B", "答案是B"; else None.
    A leading capital followed by a space is a word, not an option ("A circle")."""
    text = normalize(text)
    if m := _LETTER_ALONE.match(text):
        return m.group(1) or m.group(2)
    cues = _LETTER_CUE.findall(text)
    return cues[-1].upper() if cues else None


def mcq_reward(response: str, gold: str) -> float:
    """1 when the response's option letter is the gold letter."""
    letter, gold_letter = option_letter(final_answer(response)), option_letter(gold)
    if gold_letter is None:
        raise ValueError(f"MCQ answer {gold!r} names no option letter")
    return float(letter == gold_letter)


def last_number(text: str) -> float | None:
    """The last number in a text (thousands separators allowed), or None."""
    numbers = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", normalize(text)))
    return float(numbers[-1]) if numbers else None


def count_reward(response: str, gold: str | int | float) -> float:
    """1 when the last number of the answer equals the gold count."""
    target = last_number(str(gold))
    if target is None:
        raise ValueError(f"count answer {gold!r} is not a number")
    value = last_number(final_answer(response))
    return float(value is not None and math.isclose(value, target, abs_tol=1e-6))


def math_reward(response: str, gold: str) -> float:
    """1 when the answer is mathematically equal to the gold answer."""
    return float(math_equal(final_answer(response), gold))


def answer_reward(response: str, answer: str, kind: str, *, question: str = "",
                  judge: Callable[[str, str, str], float] | None = None) -> float:
    """Answer correctness dispatched by the prompt's kind. "open" answers are not verifiable: `judge(question,
    response, answer)` scores them (see sail_jax.rl.judge)."""
    if kind == "math":
        return math_reward(response, answer)
    if kind == "mcq":
        return mcq_reward(response, answer)
    if kind == "count":
        return count_reward(response, answer)
    if kind == "open":
        if judge is None:
            raise ValueError("kind 'open' needs a judge to score the answer")
        return float(judge(question, response, answer))
    raise ValueError(f"unknown prompt kind {kind!r}; expected one of {KINDS}")


def format_reward(response: str) -> float:
    """1 for exactly one non-empty `<think>...</think>` at the start, followed by an answer with a `\\boxed{}`."""
    m = _THINK.fullmatch(response)
    if m is None or response.count("<think>") != 1 or response.count("</think>") != 1:
        return 0.0
    think, answer = m.group(1), m.group(2)
    return float(bool(think.strip()) and bool(extract_boxed(answer)))


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the mixed reward's components; non-negative and summing to 1, so the reward stays in [0, 1]."""

    answer: float = 1.0
    think: float = 0.0
    format: float = 0.0

    def __post_init__(self):
        values = (self.answer, self.think, self.format)
        if min(values) < 0 or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
            raise ValueError(f"reward weights must be >= 0 and sum to 1, got answer={self.answer}, "
                             f"think={self.think}, format={self.format} (sum {sum(values):g})")


def mixed_reward(answer: float, think: float, format: float, weights: RewardWeights) -> float:
    """Weighted sum of the answer, think-quality and format rewards."""
    return weights.answer * answer + weights.think * think + weights.format * format
