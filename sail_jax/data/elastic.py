"""Elastic data positions: iterator states that a run with another number of processes can re-split exactly.

A checkpoint holds one iterator state per process. To resume on another process count, the states of all the old
processes are merged into one global position (`merge_states`) and each new process takes its part of it. Two
kinds of state allow that, marked by their `"elastic"` key:

- `"global"`: the state is the same on every process and stands for the whole global batch stream (the
  synthetic source: the global step; each process derives its rows from it).
- `"shards"`: `{"num_shards": V, "shards": {"v": state}}`: the data is split into V fixed data shards (each a
  whole pipeline over records `v::V`, yielding rows `v*B/V ... (v+1)*B/V - 1` of every global batch of B rows);
  a process reads a contiguous block of V/P of them (`ShardedIterator`). The global batch is the same for every
  P that divides V, so the samples, and even the batches, of a resumed run are those of the uninterrupted run.

Any other state resumes only on the process count that wrote it; `merge_states` refuses it naming why.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

GLOBAL, SHARDS = "global", "shards"


class NotResplittable(ValueError):
    """Per-process iterator states that cannot be re-split for another number of processes."""


def owned_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The contiguous block of data shards process `process_index` reads."""
    if num_shards % process_count:
        raise ValueError(f"{num_shards} data shards cannot be split over {process_count} processes; use a process "
                         f"count that divides the number of data shards (grain_data.data_shards)")
    k = num_shards // process_count
    return range(process_index * k, (process_index + 1) * k)


def merge_states(states: Sequence[Any], process_count: int) -> dict[str, Any]:
    """One global position from the states of all `len(states)` processes of a run, to resume on
    `process_count` processes (module docstring); raises NotResplittable when that is not exact."""
    old = len(states)
    kinds = {s.get("elastic") if isinstance(s, Mapping) else None for s in states}
    if kinds == {GLOBAL}:
        first = json.dumps(states[0], sort_keys=True)
        if all(json.dumps(s, sort_keys=True) == first for s in states):
            return dict(states[0])
        raise NotResplittable(f"the {old} processes' global data positions differ")
    if kinds == {SHARDS}:
        counts = {int(s["num_shards"]) for s in states}
        shards = {k: v for s in states for k, v in s["shards"].items()}
        if len(counts) != 1 or sorted(map(int, shards)) != list(range(next(iter(counts)))):
            raise NotResplittable(f"the {old} processes' data shard states do not cover one set of shards")
        n = next(iter(counts))
        if n % process_count:
            raise NotResplittable(f"the data stream has {n} data shards, which {process_count} processes cannot "
                                  f"split evenly (use a process count that divides {n}; the number of data shards "
                                  f"is fixed when the run starts: grain_data.data_shards)")
        return {"elastic": SHARDS, "num_shards": n, "shards": shards}
    raise NotResplittable(f"the data iterator position was saved per process by {old} process(es) and cannot be "
                          f"re-split for {process_count}: this data source has no global position (Grain data "
                          f"needs grain_data.data_shards set when the run starts; see BUILD.md)")


def join_parts(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Shards' batches as one: arrays concatenated row-wise in shard order, host-side counts (0-d) summed."""
    if len(parts) == 1:
        return dict(parts[0])
    return {k: np.sum([p[k] for p in parts]) if np.ndim(parts[0][k]) == 0 else np.concatenate([p[k] for p in parts])
            for k in parts[0]}


class ShardedIterator(Iterator[dict[str, np.ndarray]]):
    """The batches of data shards `shards` (of `num_shards`), concatenated row-wise in shard order.

    `make(v)` builds the iterator of shard v (get_state/set_state). The state is `"elastic": "shards"`; a state of
    all shards (merged from another process count) restores the shards this process reads."""

    def __init__(self, make: Callable[[int], Any], shards: range, num_shards: int):
        self.num_shards = num_shards
        self._its = {v: make(v) for v in shards}

    def __iter__(self) -> ShardedIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return join_parts([next(it) for it in self._its.values()])  # a finite stream ends with its first shard

    def get_state(self) -> dict[str, Any]:
        return {"elastic": SHARDS, "num_shards": self.num_shards,
                "shards": {str(v): it.get_state() for v, it in self._its.items()}}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("elastic") != SHARDS:  # a checkpoint from before data shards: one pipeline per process
            if len(self._its) != 1:
                raise NotResplittable(f"the checkpoint's data position is one pipeline per process, this run reads "
                                      f"{len(self._its)} data shards per process")
            state = {"elastic": SHARDS, "num_shards": self.num_shards,
                     "shards": {str(v): state for v in self._its}}
        if int(state["num_shards"]) != self.num_shards:
            raise NotResplittable(f"the checkpoint's data stream has {state['num_shards']} data shards, this run "
                                  f"{self.num_shards} (grain_data.data_shards, by default the process count, must "
                                  f"stay the same on resume: set --gin.grain_data.data_shards={state['num_shards']})")
        for v, it in self._its.items():
            it.set_state(state["shards"][str(v)])
            if hasattr(it, "start_prefetch"):  # as Grain's own checkpoint handler does after restoring
                it.start_prefetch()
