"""DAPO dynamic sampling: keep only prompt groups whose answers are neither all right nor all wrong.

A group where every sample has the same accuracy has zero group-relative advantage, so it adds no gradient but still
dilutes the token mean. The filter looks at raw answer ACCURACY, not the shaped reward: length shaping would make an
all-correct group look mixed. Generation repeats until `target_groups` informative groups are collected or
`max_gen_rounds` rounds have run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GroupFilter:
    """Which groups of one round to keep; `keep_groups` in first-appearance order, `keep` per sample."""

    keep_groups: list
    keep: np.ndarray
    n_groups: int
    all_correct: int
    all_wrong: int

    @property
    def dropped(self) -> int:
        return self.all_correct + self.all_wrong


def filter_groups(accuracy, group_ids) -> GroupFilter:
    """Keep the groups whose accuracies (each in [0, 1]) are not all 0 and not all 1."""
    acc = np.asarray(accuracy, np.float64)
    ids = np.asarray(group_ids)
    if acc.ndim != 1 or ids.shape != acc.shape:
        raise ValueError(f"accuracy and group_ids must both be [N], got {acc.shape} and {ids.shape}")
    if acc.size and not (acc.min() >= 0 and acc.max() <= 1):
        raise ValueError("accuracy must be in [0, 1]")
    keep_groups, all_correct, all_wrong = [], 0, 0
    order = list(dict.fromkeys(ids.tolist()))
    for g in order:
        a = acc[ids == g]
        if np.all(a == 1):
            all_correct += 1
        elif np.all(a == 0):
            all_wrong += 1
        else:
            keep_groups.append(g)
    return GroupFilter(keep_groups, np.isin(ids, keep_groups), len(order), all_correct, all_wrong)


@dataclass
class GroupBatch:
    """Groups collected across generation rounds: `samples[i]` belongs to group `group_ids[i]` (0, 1, ... in
    collection order), plus the counts to log."""

    target_groups: int
    max_gen_rounds: int
    samples: list = field(default_factory=list)
    group_ids: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    rounds: int = 0
    groups_seen: int = 0
    dropped_all_correct: int = 0
    dropped_all_wrong: int = 0
    surplus: int = 0
    n_groups: int = 0

    def __post_init__(self):
        if self.target_groups < 1 or self.max_gen_rounds < 1:
            raise ValueError(f"need target_groups >= 1 and max_gen_rounds >= 1, got {self.target_groups}, "
                             f"{self.max_gen_rounds}")

    @property
    def full(self) -> bool:
        return self.n_groups >= self.target_groups

    @property
    def needs_more(self) -> bool:
        """True while the batch is short of groups and rounds remain."""
        return not self.full and self.rounds < self.max_gen_rounds

    def add(self, samples: Sequence[Any], accuracy, group_ids) -> GroupFilter:
        """Add one generation round; informative groups are kept up to `target_groups`, the rest counted."""
        if len(samples) != len(accuracy):
            raise ValueError(f"{len(samples)} samples but {len(accuracy)} accuracies")
        result = filter_groups(accuracy, group_ids)
        self.rounds += 1
        self.groups_seen += result.n_groups
        self.dropped_all_correct += result.all_correct
        self.dropped_all_wrong += result.all_wrong
        ids = np.asarray(group_ids)
        for g in result.keep_groups:
            if self.full:
                self.surplus += 1
                continue
            for i in np.flatnonzero(ids == g):
                self.samples.append(samples[i])
                self.group_ids.append(self.n_groups)
                self.accuracy.append(float(accuracy[i]))
            self.n_groups += 1
        return result

    def stats(self) -> dict[str, int]:
        return {"gen_rounds": self.rounds, "groups_seen": self.groups_seen, "groups_kept": self.n_groups,
                "dropped_all_correct": self.dropped_all_correct, "dropped_all_wrong": self.dropped_all_wrong,
                "surplus_groups": self.surplus, "batch_full": int(self.full)}


def fill_batch(generate: Callable[[int], tuple[Sequence[Any], Any, Any]], *, target_groups: int,
               max_gen_rounds: int) -> GroupBatch:
    """Call `generate(round_index) -> (samples, accuracy, group_ids)` until the batch holds `target_groups` groups
    or `max_gen_rounds` rounds have run (then the batch may be short: check `full`)."""
    batch = GroupBatch(target_groups, max_gen_rounds)
    while batch.needs_more:
        batch.add(*generate(batch.rounds))
    return batch
