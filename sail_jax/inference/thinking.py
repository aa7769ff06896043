"""Thinking-mode helpers: the CoT instruction, splitting `<think>` from the answer, `\\boxed{}`.

SAIL-VL2 has no `enable_thinking` switch; the user text gets the instruction appended (`with_thinking`, "\\n" form as
VLMEvalKit). The expected output is `<think>…</think>…\\boxed{answer}`; VLMEvalKit takes the first `\\boxed{…}`
after `</think>` (braces may nest) and falls back to the last `\\boxed{…}` anywhere.
"""

from __future__ import annotations

from sail_jax.data.chat import THINKING_INSTRUCTION, with_thinking

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
BOXED = "\\boxed{"

__all__ = ["THINKING_INSTRUCTION", "with_thinking", "split_thinking", "extract_boxed", "extract_answer"]


def split_thinking(text: str) -> tuple[str, str]:
    """(thought, answer). Without a closing `</think>` there is no thought and the whole text is the answer; a
    missing `<think>` (generation that started inside the block) counts the text before `</think>` as thought."""
    close = text.find(THINK_CLOSE)
    if close < 0:
        return "", text.strip()
    head = text[:close]
    open_ = head.find(THINK_OPEN)
    thought = head[open_ + len(THINK_OPEN):] if open_ >= 0 else head
    return thought.strip(), text[close + len(THINK_CLOSE):].strip()


def _boxed_spans(text: str, start: int = 0) -> list[tuple[int, int]]:
    """(begin, end) of the contents of each complete `\\boxed{…}` at or after `start`, braces balanced."""
    spans = []
    i = text.find(BOXED, start)
    while i >= 0:
        depth, j = 1, i + len(BOXED)
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:  # unbalanced to the end: no complete box from here on
            break
        spans.append((i + len(BOXED), j - 1))
        i = text.find(BOXED, j)
    return spans


def extract_boxed(text: str) -> str | None:
    """Contents of the last complete `\\boxed{…}` (nested braces kept), or None."""
    spans = _boxed_spans(text)
    return text[spans[-1][0]:spans[-1][1]] if spans else None


def extract_answer(text: str) -> str | None:
    """VLMEvalKit's rule: with a `<think>…</think>` block, the first `\\boxed{…}` after it; otherwise (or when
    there is none) the last `\\boxed{…}` in the text; None when the text has no complete box."""
    open_ = text.find(THINK_OPEN)
    close = text.find(THINK_CLOSE, open_ + len(THINK_OPEN)) if open_ >= 0 else -1
    if close >= 0:
        after = _boxed_spans(text, close + len(THINK_CLOSE))
        if after:
            return text[after[0][0]:after[0][1]]
    return extract_boxed(text)
