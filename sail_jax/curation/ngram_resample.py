"""`curate ngram-resample`: the paper's n-gram-level resampling of captions and synthetic VQA, which flattens the
distribution of phrasing (template openings such as "the image shows a" dominate generated text).

The rule, in two streaming passes (memory grows with the n-gram vocabulary, not with the file):

1. Count c(g), the occurrences of every word n-gram g in the chosen turns of all valid records.
2. An n-gram selects a record that contains it with probability min(1, T / c(g)), T = `max_count`: rare n-grams
   (c(g) <= T) always do, a head n-gram only in proportion T / c(g). A record is kept when at least one of its
   distinct n-grams selects it:  p_keep = 1 - prod_{g in G(record)} (1 - min(1, T / c(g))).
   So any record carrying a tail n-gram is kept, and records made only of over-represented phrasing are thinned
   until each head n-gram is expected in about T of them (the balancing rule of MetaCLIP's metadata curation,
   applied to n-grams). The draw is `random.Random(seed)` in file order: the same file and seed keep the same
   records. Records with fewer than n words carry no n-gram evidence and are kept.

The loader samples records, it does not weight them, so an over-represented record is dropped rather than
down-weighted. The report gives the Shannon entropy (bits) of the n-gram distribution before and after, with the
number of distinct n-grams and the most frequent ones.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter

from sail_jax.curation.stream import Curation, Record, Report, read_records
from sail_jax.curation.text import ngrams, words

TURNS = {"gpt": ("assistant",), "human": ("user",), "all": ("user", "assistant")}
TOP = 10


def record_ngrams(record: Record, n: int, turns: str) -> list[str]:
    """The word n-grams of a record's chosen turns (n-grams do not cross turns)."""
    roles = TURNS[turns]
    out = []
    for message in record.conversation.messages:
        if message["role"] in roles:
            out.extend(ngrams(words(message["content"]), n))
    return out


def keep_probability(grams: list[str], counts: Counter[str], max_count: int) -> float:
    """1 - prod over the distinct n-grams of (1 - min(1, T / c(g))); 1 when there is no n-gram."""
    miss = 1.0
    for g in set(grams):
        miss *= 1.0 - min(1.0, max_count / counts[g])
        if miss == 0.0:
            break
    return 1.0 - miss if grams else 1.0


def entropy_bits(counts: Counter[str]) -> float:
    total = sum(counts.values())
    if not total:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def _distribution(counts: Counter[str]) -> dict:
    return {"entropy_bits": round(entropy_bits(counts), 6), "ngrams": sum(counts.values()), "distinct": len(counts),
            "top": [[g, c] for g, c in counts.most_common(TOP)]}


def resample_file(src: str | os.PathLike, out: str | os.PathLike, report: str | os.PathLike, max_count: int,
                  n: int = 3, turns: str = "gpt", seed: int = 0, max_bad_fraction: float = 0.05) -> Report:
    """Two passes over `src` (count, then keep each record with its p_keep); returns the report."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if max_count < 1:
        raise ValueError(f"--max-count must be >= 1, got {max_count}")
    if turns not in TURNS:
        raise ValueError(f"--turns {turns!r}: expected one of {', '.join(TURNS)}")
    params = {"n": n, "max_count": max_count, "turns": turns, "seed": seed}
    with Curation("ngram-resample", src, out, report, params, max_bad_fraction=max_bad_fraction) as run:
        counts: Counter[str] = Counter()
        for record in read_records(src):
            counts.update(record_ngrams(record, n, turns))
        before = _distribution(counts)
        kept: Counter[str] = Counter()
        rng = random.Random(seed)
        for record in run.records():
            grams = record_ngrams(record, n, turns)
            if rng.random() < keep_probability(grams, counts, max_count):
                run.keep(record.obj)
                kept.update(grams)
            else:
                run.drop("over-represented n-grams")
        run.report.stats = {"before": before, "after": _distribution(kept)}
    return run.report
