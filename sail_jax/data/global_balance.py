"""Visual packing on a tile budget over ALL data-parallel devices of the global batch, not one data shard's.

Per data shard (`data.elastic`), `tile_budget.BudgetedBatchIterator` places its rows on the devices that take
its rows and defers what fits nowhere, so a shard of tile-heavy rows defers rows while a light shard's budget
slots stay empty. Here one assignment (`assign_global`) places the candidate rows of every shard on every shard's
devices:

* each round every process offers its shards' candidate rows: first the rows they carry over, then as many fresh
  rows as the shard's own devices have free row slots (as the per-shard iterator reads them; once only shards that
  stopped reading have free slots, the others read up to their migrant allowance for them); the row LOADS (tile
  counts) of all shards are exchanged (`exchange`: one `process_allgather` of a small int array per round, a few
  rounds per step), and every host computes the same placement from them;
* rows are placed longest first (carried-over rows before them) on the least-loaded device with a free row slot
  and room in the budget, a device of the row's own shard when that is within `slack` tiles of it (so rows stay
  home unless moving them helps); a shard sends at most `max_migrants` rows a step to other shards' devices;
* the migrant ROWS that cross processes move in one `process_allgather` of a fixed [shards, max_migrants] row
  buffer (skipped when no row crosses a process); rows that fit nowhere stay deferred in their home shard, whose
  checkpointable state is the per-shard iterator's, so the state stays one per shard and re-splits elastically.

The placement depends only on the shards' rows, never on which process reads which shard: a run gives the same
global batches on every process count that divides the number of data shards. Each process's batch carries
`deferred_rows` = the rows waiting in ALL shards after the step (every host knows them from the exchange), so the
trainer logs the run's count on any process.

Without a tile budget (fixed tile slots, or SAIL-ViT-AnyRes rows of `max_patches` patch slots) the same placement
balances the rows' tile / patch loads over all devices: the shards' iterators keep their rows' slots
(`BudgetedBatchIterator(keep_slots=True)`) and the budget is rows per device x slots per row, so every row fits
any device with a free row slot: a row waits only when its shard's migrant allowance is spent while migrants took
its own devices' slots (rare; counted as above).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from sail_jax.data.elastic import ShardedIterator, join_parts
from sail_jax.data.tile_budget import BudgetedBatchIterator

Exchange = Callable[[Any], Any]  # this process's [k, ...] arrays (a pytree) -> all shards' [num_shards, ...]


def assign_global(loads: Sequence[Sequence[int]], n_devices: int, rows_per_device: int, budget: int,
                  ordered: Sequence[int] | None = None, max_migrants: int | None = None, slack: int = 0,
                  load: np.ndarray | None = None, count: np.ndarray | None = None,
                  sent: np.ndarray | None = None) -> list[np.ndarray]:
    """Global device (shard * n_devices + d) of each candidate row of each shard, -1 where it is deferred.

    `loads[v]`: the candidate rows of shard v; the first `ordered[v]` of them are carried over and go first, the
    shards' carried-over rows taken in turn (oldest first), then all other rows by decreasing load (as
    `tile_budget.assign_rows`). Each goes to the least-loaded device with a free row slot and room in the budget;
    the least-loaded such device of its own shard is taken instead when its load is within `slack` of that (or the
    shard already sent `max_migrants` rows to other shards). With one shard this is `assign_rows`, with
    `max_migrants` 0 it is `assign_rows` per shard. `load` / `count` [shards * n_devices] and `sent` [shards]
    (rows each shard sent elsewhere) carry over between calls of one batch and are updated in place."""
    shards = len(loads)
    flat = np.concatenate([np.asarray(x, np.int64).reshape(-1) for x in loads]) if shards else np.zeros(0, np.int64)
    home = np.repeat(np.arange(shards), [len(x) for x in loads])
    start = np.concatenate([[0], np.cumsum([len(x) for x in loads])]).astype(np.int64)
    ordered = [0] * shards if ordered is None else list(ordered)
    cap = np.iinfo(np.int64).max if max_migrants is None else max_migrants
    load = np.zeros(shards * n_devices, np.int64) if load is None else load
    count = np.zeros(shards * n_devices, np.int64) if count is None else count
    sent = np.zeros(shards, np.int64) if sent is None else sent
    first = [start[v] + i for i in range(max(ordered, default=0)) for v in range(shards) if i < ordered[v]]
    rest = np.asarray([r for r in range(len(flat)) if r - start[home[r]] >= ordered[home[r]]], np.int64)
    device = np.full(len(flat), -1, np.int64)
    for r in (*first, *rest[np.argsort(-flat[rest], kind="stable")]):
        h, ok = int(home[r]), (count < rows_per_device) & (load + flat[r] <= budget)
        own = np.arange(len(ok)) // n_devices == h
        best = int(np.flatnonzero(ok)[np.argmin(load[ok])]) if ok.any() else -1
        if (ok & own).any():
            mine = int(np.flatnonzero(ok & own)[np.argmin(load[ok & own])])
            if load[mine] <= load[best] + slack or sent[h] >= cap:
                best = mine
        elif sent[h] >= cap:
            best = -1
        if best >= 0:
            device[r], load[best], count[best] = best, load[best] + flat[r], count[best] + 1
            sent[h] += best // n_devices != h
    return [device[start[v]:start[v + 1]] for v in range(shards)]


def local_exchange(x: Any) -> Any:
    """The exchange of a run whose one process reads every shard: nothing to send."""
    return x


def process_exchange(x: Any) -> Any:
    """Every process's [k, ...] arrays, concatenated in process order (= shard order: each process reads a
    contiguous block of shards)."""
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def spread(total: int, room: np.ndarray) -> np.ndarray:
    """`total` split over the shards one at a time in turn, shard v taking at most `room[v]`."""
    out = np.zeros_like(room)
    while total and (out < room).any():
        for v in np.flatnonzero(out < room)[:total]:
            out[v] += 1
            total -= 1
    return out


class GlobalBudgetedIterator(ShardedIterator):
    """The batches of data shards `shards` (of `num_shards`), their rows placed over the devices of all shards
    (module docstring). `make(v)` gives shard v's checkpointable iterator (the state `ShardedIterator` stores) and
    `rows[v]` its `BudgetedBatchIterator` (the same one, or what that wraps), whose batch is never drawn directly.
    Every process must call `next` in step: each call issues the same collectives on every process."""

    def __init__(self, make: Callable[[int], Any], rows: Mapping[int, BudgetedBatchIterator], shards: range,
                 num_shards: int, shard_rows: int, n_devices: int, budget: int, max_migrants: int,
                 exchange: Exchange = local_exchange, slack: int | None = None):
        super().__init__(make, shards, num_shards)
        self._rows = {v: rows[v] for v in shards}
        self._shard_rows, self._n, self._budget = shard_rows, n_devices, budget
        self._max_migrants, self._exchange = max_migrants, exchange
        self._slack = budget // 8 if slack is None else slack  # a light row does not move for a tile or two
        self._per_process = len(shards)

    def __next__(self) -> dict[str, np.ndarray]:
        S, n, p, B = self.num_shards, self._n, self._shard_rows // self._n, self._shard_rows
        load, count = np.zeros(S * n, np.int64), np.zeros(S * n, np.int64)
        sent, exhausted = np.zeros(S, np.int64), np.zeros(S, bool)
        deferred = np.zeros(S, np.int64)
        cands: dict[int, list[tuple[int, dict[str, Any]]]] = {v: [] for v in self._rows}  # this process's rows
        placed: list[tuple[int, int, int]] = []  # (home shard, candidate number within its shard, device)
        offered = np.zeros(S, np.int64)

        def place(fresh: dict[int, list[tuple[int, dict[str, Any]]]], ordered: bool) -> np.ndarray:
            """One round: exchange the offered rows' loads, place them; the number each shard offered."""
            # Static width: fewer than B rows wait before a round, which reads at most max(B, max_migrants).
            local = np.full((len(self._rows), 1 + B + max(B, self._max_migrants)), -1, np.int32)
            for i, (v, rows) in enumerate(fresh.items()):
                local[i, 0] = len(rows)
                local[i, 1:1 + len(rows)] = [self._rows[v].load(r) for _, r in rows]
                cands[v].extend(fresh[v])
            table = np.asarray(self._exchange(local))
            loads = [table[v, 1:1 + table[v, 0]] for v in range(S)]
            device = assign_global(loads, n, p, self._budget, [len(x) for x in loads] if ordered else None,
                                   self._max_migrants, self._slack, load, count, sent)
            for v in range(S):
                for i, g in enumerate(device[v]):
                    if g < 0:
                        deferred[v] += 1
                    else:
                        placed.append((v, int(offered[v]) + i, int(g)))
                offered[v] += len(loads[v])
            return table[:, 0]

        place({v: it.waiting for v, it in self._rows.items()}, ordered=True)  # carried-over rows first
        while True:  # fresh rows fill each shard's free slots; a shard stops reading once a batch of rows waits
            free = n * p - count.reshape(S, n).sum(axis=1)
            active = ~exhausted & (deferred < B)
            want = np.where(active, free, 0)
            if not want.any():  # slots left only on shards that stopped: others read rows that may move there
                want = spread(int(free.sum()), np.where(active, np.maximum(self._max_migrants - sent, 0), 0))
            if not want.any():
                break
            got = place({v: it.pull(int(want[v])) for v, it in self._rows.items()}, ordered=False)
            exhausted |= got < want
        if not count.sum():
            raise StopIteration
        return self._batches(cands, placed, int(deferred.sum()))

    def _batches(self, cands: dict[int, list[tuple[int, dict[str, Any]]]], placed: list[tuple[int, int, int]],
                 deferred: int) -> dict[str, np.ndarray]:
        n, k = self._n, self._per_process
        process = lambda v: v // k
        me = process(next(iter(self._rows)))
        migrants, slots = {}, Counter()  # (home shard, candidate number) -> slot in its shard's migrant buffer
        for v, i, g in sorted(placed):
            if g // n != v:
                migrants[v, i], slots[v] = slots[v], slots[v] + 1
        template = next((it.template for it in self._rows.values() if it.template is not None), None)
        received = {}
        if any(process(v) != process(g // n) for v, i, g in placed if (v, i) in migrants):
            if template is None:
                raise ValueError(f"data shards {list(self._rows)} have no rows at all; use fewer data shards "
                                 f"(grain_data.data_shards) or more records")
            buffer = {key: np.zeros((k, self._max_migrants, *x.shape), x.dtype) for key, x in template.items()}
            for (v, i), slot in migrants.items():
                if v in cands:
                    for key in buffer:
                        buffer[key][v - me * k, slot] = cands[v][i][1][key]
            gathered = self._exchange(buffer)
            mine = {(v, i) for v, i, g in placed if g // n in self._rows}  # rows this process's shards take
            received = {(v, i): {key: np.asarray(gathered[key][v, slot]) for key in buffer}
                        for (v, i), slot in migrants.items() if process(v) != me and (v, i) in mine}
        on = {v: [[] for _ in range(n)] for v in self._rows}
        for v, i, g in sorted(placed):
            if g // n in on:
                on[g // n][g % n].append(((v, i), cands[v][i][1] if v in cands else received[v, i]))
        kept = {(v, i) for v, i, _ in placed}
        parts = []
        for v, it in self._rows.items():
            waiting = [x for i, x in enumerate(cands[v]) if (v, i) not in kept]
            it.commit(waiting)
            parts.append(it.batch(on[v], len(waiting), template))
        out = join_parts(parts)
        if "deferred_rows" in out:  # every host knows every shard's deferrals: the run's count, not its shards'
            out["deferred_rows"] = np.int64(deferred)
        return out
