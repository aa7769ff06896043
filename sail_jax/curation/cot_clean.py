"""`curate cot-clean`: the paper's LongCoT cleaning, on records whose assistant turns carry a chain of thought.

Per record, in order:
1. System turns are removed (LongCoT SFT trains without system prompts).
2. User-turn hints that conflict with thinking ("answer directly", "no explanation", "answer with a single word or
   phrase", ...) are removed: a whole sentence when it is not a question, otherwise the hint phrase alone.
3. Every assistant turn becomes `<think>\\n{thought}\\n</think>\\n{answer}` with the final answer in `\\boxed{}`. The
   thought comes from `<think>`, `<thinking>`, `<thought>` or `<reasoning>` tags, or else is the text before a
   "Final answer:" / "Answer:" line or a last line holding `\\boxed{}`; an answer without a box gets one around its
   `<answer>` tag, its "Final answer:" line, or the whole answer when it is one line. No thought: dropped
   (`no thought`); no recognisable final answer: dropped (`no final answer`).
4. Redundancy: a thought whose word tokens are mostly words of the answer adds nothing to learn from. The overlap
   is the share of thought tokens that occur in the answer; above `max_overlap` the record is dropped.
5. Length balance: thoughts are bucketed by word count (`bucket_words` wide). A first pass counts the buckets of the
   records that survive 1-4; each bucket is then capped at C records in expectation, C the largest count for which
   no bucket exceeds `max_share` of what is kept, by keeping a record of a bucket of n with probability min(1, C/n)
   (`random.Random(seed)` in file order, so the same file and seed keep the same records).
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sail_jax.curation.stream import Curation, Report, read_records
from sail_jax.curation.text import words
from sail_jax.data.sources import ROLES
from sail_jax.inference.thinking import BOXED, THINK_CLOSE, THINK_OPEN, extract_boxed

HINTS = re.compile(
    r"answer with the option'?s letter from the given choices directly"
    r"|answer (?:the question )?(?:using|with) (?:a single|one) (?:word|number)(?: or (?:a )?(?:short )?phrase)?"
    r"|(?:please )?(?:just |only )?answer (?:the question )?(?:directly|briefly|concisely)"
    r"|(?:please )?(?:do not|don't) (?:provide|give|include|output|show) (?:any )?"
    r"(?:explanations?|reasoning|steps|analysis|working)"
    r"|without (?:any )?(?:explanations?|reasoning)"
    r"|no explanations?(?: (?:is )?(?:needed|required))?"
    r"|(?:just |only )(?:give|output|provide|return) (?:the )?(?:final )?answer",
    re.IGNORECASE)
_SENTENCES = re.compile(r"((?<=[.!?。！？])[ \t]+|\n+)")
_THOUGHT = re.compile(r"<(think|thinking|thought|reasoning)>(.*?)</\1>", re.IGNORECASE | re.DOTALL)
_FINAL = re.compile(r"^[ \t]*(?:\*\*)?(?:the )?(?:final )?answer(?: is)?(?:\*\*)?[ \t]*[:：][ \t]*(?:\*\*)?(.+?)"
                    r"(?:\*\*)?[ \t]*$|^[ \t]*(?:the )?final answer is[ \t]+(.+?)[ \t]*$",
                    re.IGNORECASE | re.MULTILINE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)


def strip_hints(text: str) -> tuple[str, int]:
    """`text` without conflicting hints, and how many were removed."""
    parts = _SENTENCES.split(text)
    kept: list[str] = []
    removed = 0
    for i in range(0, len(parts), 2):
        sentence, sep = parts[i], parts[i - 1] if i else ""
        if HINTS.search(sentence):
            removed += 1
            if not sentence.rstrip().endswith(("?", "？")):
                continue
            sentence = re.sub(r"\s{2,}", " ", HINTS.sub("", sentence)).strip(" ,;:")
        kept.extend((sep, sentence) if kept else (sentence,))
    return "".join(kept).strip(), removed


def _boxed(answer: str) -> str:
    return f"{BOXED}{answer.strip().rstrip('.。')}}}"


def box_answer(answer: str) -> str | None:
    """The answer with its final answer in `\\boxed{}`, or None when none can be recognised."""
    if extract_boxed(answer) is not None:
        return answer
    if m := _ANSWER_TAG.search(answer):
        return _boxed(m[1])
    if finals := list(_FINAL.finditer(answer)):
        m = finals[-1]
        return answer[:m.start()] + _boxed(m[1] or m[2]) + answer[m.end():]
    if answer and "\n" not in answer:
        return _boxed(answer)
    return None


def split_thought(text: str) -> tuple[str, str]:
    """(thought, answer) of an assistant turn in any accepted form; an empty thought when there is none."""
    if m := _THOUGHT.search(text):
        return m[2].strip(), (text[:m.start()] + text[m.end():]).strip()
    if finals := list(_FINAL.finditer(text)):
        m = finals[-1]
        return text[:m.start()].strip(), text[m.start():].strip()
    lines = text.rstrip().rsplit("\n", 1)
    if len(lines) == 2 and extract_boxed(lines[1]) is not None:
        return lines[0].strip(), lines[1].strip()
    return "", text.strip()


def overlap(thought: str, answer: str) -> float:
    """Share of the thought's word tokens that also occur in the answer (the `\\boxed` command not counted)."""
    tokens = words(thought)
    answer_words = set(words(answer.replace(BOXED, " ")))
    return sum(t in answer_words for t in tokens) / len(tokens) if tokens else 1.0


@dataclass
class Cleaned:
    """A cleaned record, or the reason it is dropped; counts of what was changed."""

    obj: dict[str, Any]
    reason: str | None = None
    thought_words: int = 0
    system_removed: int = 0
    hints_removed: int = 0


def clean_record(obj: dict[str, Any], max_overlap: float) -> Cleaned:
    """Steps 1-4 of the module docstring on one record (a new object; the input is not changed)."""
    out = Cleaned({**obj})
    turns = []
    for turn in obj["conversations"]:
        role = ROLES[turn["from"]]
        value = turn["value"]
        if role == "system":
            out.system_removed += 1
            continue
        if role == "user":
            value, n = strip_hints(value)
            out.hints_removed += n
        elif role == "assistant":
            thought, answer = split_thought(value)
            if not thought:
                return Cleaned(obj, "no thought")
            boxed = box_answer(answer)
            if boxed is None:
                return Cleaned(obj, "no final answer")
            if overlap(thought, boxed) > max_overlap:
                return Cleaned(obj, "redundant thought")
            out.thought_words += len(words(thought))
            value = f"{THINK_OPEN}\n{thought}\n{THINK_CLOSE}\n{boxed}"
        turns.append({**turn, "value": value})
    out.obj["conversations"] = turns
    return out


def bucket_cap(counts: Counter[int], max_share: float) -> int:
    """The largest C such that, with every bucket cut to at most C records, no bucket holds more than `max_share`
    of the total. That share only grows with C, so C is found by bisection."""
    if not counts:
        return 0
    if len(counts) * max_share < 1:
        raise ValueError(f"--max-bucket-share {max_share:g} is below 1/{len(counts)}: the thoughts fall in "
                         f"{len(counts)} length buckets, so some bucket always holds at least 1/{len(counts)}")
    share = lambda c: min(max(counts.values()), c) / sum(min(n, c) for n in counts.values())
    lo, hi = 1, max(counts.values())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if share(mid) <= max_share else (lo, mid - 1)
    return lo


def clean_file(src: str | os.PathLike, out: str | os.PathLike, report: str | os.PathLike, max_overlap: float = 0.8,
               bucket_words: int = 256, max_share: float = 0.3, seed: int = 0,
               max_bad_fraction: float = 0.05) -> Report:
    """Two passes over `src`: bucket counts of the cleaned thoughts, then clean, balance and write."""
    if not 0 <= max_overlap <= 1:
        raise ValueError(f"--max-overlap must be in [0, 1], got {max_overlap}")
    if bucket_words < 1:
        raise ValueError(f"--bucket-words must be >= 1, got {bucket_words}")
    if not 0 < max_share <= 1:
        raise ValueError(f"--max-bucket-share must be in (0, 1], got {max_share}")
    params = {"max_overlap": max_overlap, "bucket_words": bucket_words, "max_bucket_share": max_share, "seed": seed}
    with Curation("cot-clean", src, out, report, params, max_bad_fraction=max_bad_fraction) as run:
        before: Counter[int] = Counter()
        for record in read_records(src):
            cleaned = clean_record(record.obj, max_overlap)
            if cleaned.reason is None:
                before[cleaned.thought_words // bucket_words] += 1
        cap = bucket_cap(before, max_share)
        after: Counter[int] = Counter()
        system_removed = hints_removed = 0
        rng = random.Random(seed)
        for record in run.records():
            cleaned = clean_record(record.obj, max_overlap)
            if cleaned.reason is not None:
                run.drop(cleaned.reason)
                continue
            bucket = cleaned.thought_words // bucket_words
            if rng.random() < min(1.0, cap / before[bucket]):
                run.keep(cleaned.obj)
                after[bucket] += 1
                system_removed += cleaned.system_removed
                hints_removed += cleaned.hints_removed
            else:
                run.drop("length bucket over cap")
        label = lambda b: f"{b * bucket_words}-{(b + 1) * bucket_words - 1}"
        run.report.stats = {"bucket_cap": cap, "thought_words_buckets_before": {label(b): before[b] for b in
                                                                                 sorted(before)},
                            "thought_words_buckets_after": {label(b): after[b] for b in sorted(after)},
                            "system_prompts_removed": system_removed, "hints_removed": hints_removed}
    return run.report
