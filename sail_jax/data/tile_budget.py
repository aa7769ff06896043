"""Visual packing on a budget: each data-parallel device runs the ViT on at most `budget` tiles, not on
rows x max_tiles slots, so empty slots cost nothing.

The units are generic "loads" (tile counts; an AnyRes model has no tile budget: its rows are patch-balanced by
`packing`, or over all data shards by `global_balance` through `BudgetedBatchIterator(keep_slots=True)`):

* `assign_rows` places rows on devices (a fixed number of rows each, the rows the batch sharding gives a device)
  so that no device's load passes the budget: rows carried over from earlier batches first, in their order, then
  the fresh rows by decreasing load, each on the least-loaded device that still has room (longest-processing-time
  greedy under two capacities). A row that fits nowhere is DEFERRED: it waits for a later batch, never dropped.
* `balanced_loads` / `auto_budget`: the budget is static (the step is compiled for it), so it is chosen once from
  the data: a quantile of the per-device loads that balancing gives on the first batches, rounded up.
* `pack_tiles` lays the tiles of each device's rows out as that device's block of `budget` tile slots plus
  `tile_index` [devices, budget, 2]: (row within the device's rows, tile ordinal within that row), -1 where a slot is
  empty; the model scatters each tile's features into its own row (`models.sail_vl.scatter_tile_features`).
* `BudgetedBatchIterDataset` is the pipeline stage that does all this per batch and keeps deferred rows in its
  checkpointable state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from sail_jax.config import VisionConfig
from sail_jax.data.batch import DTYPES
from sail_jax.data.packing import empty_row, row_tiles, slot_arrays, token_arrays, vision_key


def assign_rows(loads: Sequence[int], n_devices: int, rows_per_device: int, budget: int, ordered: int = 0,
                start_load: np.ndarray | None = None, start_rows: np.ndarray | None = None) -> np.ndarray:
    """Device of each row (-1: deferred). The first `ordered` rows are placed in their order (rows carried over
    from earlier batches, oldest first), the rest by decreasing load; each goes to the least-loaded device with
    fewer than `rows_per_device` rows whose load stays <= `budget`. `start_load` / `start_rows` [n_devices]: what
    the devices already hold (updated in place)."""
    loads = np.asarray(loads, np.int64)
    load = np.zeros(n_devices, np.int64) if start_load is None else start_load
    count = np.zeros(n_devices, np.int64) if start_rows is None else start_rows
    device = np.full(len(loads), -1, np.int64)
    rest = ordered + np.argsort(-loads[ordered:], kind="stable")
    for r in (*range(ordered), *rest):
        ok = (count < rows_per_device) & (load + loads[r] <= budget)
        if ok.any():
            d = int(np.flatnonzero(ok)[np.argmin(load[ok])])
            device[r], load[d], count[d] = d, load[d] + loads[r], count[d] + 1
    return device


def balanced_loads(loads: Sequence[int], n_devices: int) -> np.ndarray:
    """Per-device loads of one batch's rows balanced over `n_devices` (equal row counts, no budget)."""
    loads = np.asarray(loads, np.int64)
    if n_devices < 1 or len(loads) % n_devices:
        raise ValueError(f"{len(loads)} rows cannot be split evenly over {n_devices} device(s)")
    device = assign_rows(loads, n_devices, len(loads) // n_devices, int(loads.sum()))
    return np.bincount(device, weights=loads, minlength=n_devices).astype(np.int64)


def auto_budget(batches: Sequence[Sequence[int]], n_devices: int, quantile: float, min_budget: int,
                multiple: int = 1) -> int:
    """The `quantile` of the balanced per-device loads over `batches` (each a batch's row loads), rounded up to a
    `multiple`, at least `min_budget` (the largest load one row can have, so every row fits on an empty device)."""
    if not 0 < quantile <= 1:
        raise ValueError(f"tile budget quantile={quantile} must be in (0, 1]")
    per_device = np.concatenate([balanced_loads(b, n_devices) for b in batches]) if batches else np.zeros(1)
    q = math.ceil(float(np.quantile(per_device, quantile)))
    return max(min_budget, multiple * math.ceil(q / multiple))


def pack_tiles(pixel_values: np.ndarray, tile_mask: np.ndarray, n_devices: int, budget: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Fixed tile slots [B, max_tiles, ...] + mask [B, max_tiles] -> (pixels [n_devices*budget, ...], tile_index
    [n_devices, budget, 2]) for devices taking contiguous blocks of B / n_devices rows. The k-th real tile of a row
    keeps ordinal k. Fails if a device's rows hold more than `budget` tiles."""
    rows = tile_mask.shape[0]
    if n_devices < 1 or rows % n_devices:
        raise ValueError(f"{rows} rows cannot be split evenly over {n_devices} device(s)")
    per_device = rows // n_devices
    pixels = np.zeros((n_devices * budget, *pixel_values.shape[2:]), pixel_values.dtype)
    index = np.full((n_devices, budget, 2), -1, np.int32)
    for d in range(n_devices):
        r, slot = np.nonzero(tile_mask[d * per_device:(d + 1) * per_device])
        if len(r) > budget:
            raise ValueError(f"device {d}'s rows hold {len(r)} tiles, more than the tile budget {budget}")
        ordinal = np.arange(len(r)) - np.searchsorted(r, r)  # k-th real tile of its row (nonzero is row-major)
        pixels[d * budget:d * budget + len(r)] = pixel_values[d * per_device + r, slot]
        index[d, :len(r)] = np.stack([r, ordinal], axis=1)
    return pixels, index


class BudgetedBatchIterator(grain.DatasetIterator):
    """Deferred rows survive checkpoints without storing pixels: the state is the parent's state before the
    oldest waiting row (`parent`), how many rows were read since (`read`) and which of them still wait
    (`waiting`); restoring re-reads those rows and keeps the waiting ones.

    `keep_slots`: the batch keeps each row's slots as `packing.VisualBatchIterDataset` lays them out (tile slots +
    tile_mask, or with `anyres` the packed AnyRes rows, loads counted in patches) instead of packing tiles into the
    budget; the global placement uses this with budget = rows per device x slots per row, so every row fits any
    device with a free row slot and the placement balances."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, n_devices: int, budget: int, pad_id: int,
                 keep_slots: bool = False, anyres: VisionConfig | None = None):
        super().__init__(parent)
        if anyres is not None and not keep_slots:
            raise ValueError("AnyRes rows keep their patch slots: there is no tile budget to pack them into")
        self._batch_size, self._n_devices, self._budget, self._pad_id = batch_size, n_devices, budget, pad_id
        self._keep_slots, self._anyres = keep_slots, anyres
        self._read = 0  # rows read from the parent so far (an ordinal per row)
        self._marks: list[tuple[int, Any]] = [(0, parent.get_state())]  # (ordinal, parent state before it)
        self._waiting: list[tuple[int, dict[str, Any]]] = []  # deferred (ordinal, row), oldest first
        self._template: dict[str, Any] | None = None
        self._exhausted = False

    @property
    def template(self) -> dict[str, Any] | None:
        """An empty row (zeros shaped like the rows read), None before the first row."""
        return self._template

    def load(self, row: Mapping[str, Any]) -> int:
        """A row's vision load: real tiles, or AnyRes patches."""
        return row_tiles(row, vision_key(self._anyres))

    @property
    def waiting(self) -> list[tuple[int, dict[str, Any]]]:
        """The deferred (ordinal, row)s, oldest first."""
        return list(self._waiting)

    def pull(self, n: int) -> list[tuple[int, dict[str, Any]]]:
        """Up to `n` fresh (ordinal, row)s from the parent (fewer once it is exhausted)."""
        out = []
        while len(out) < n and not self._exhausted:
            try:
                row = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            if self._template is None:
                self._template = empty_row(row)
            out.append((self._read, row))
            self._read += 1
        return out

    def __next__(self) -> dict[str, np.ndarray]:
        n, per_device = self._n_devices, self._batch_size // self._n_devices
        load, count = np.zeros(n, np.int64), np.zeros(n, np.int64)
        placed: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in range(n)]
        waiting: list[tuple[int, dict[str, Any]]] = []

        def place(rows: list[tuple[int, dict[str, Any]]], ordered: int) -> None:
            device = assign_rows([self.load(r) for _, r in rows], n, per_device, self._budget, ordered, load, count)
            for d, row in zip(device, rows):
                (waiting if d < 0 else placed[d]).append(row)

        place(self._waiting, len(self._waiting))  # rows deferred earlier go first, oldest first
        # Fresh rows fill the free slots; deferring stops reading once a batch of rows waits.
        while (free := self._batch_size - int(count.sum())) and len(waiting) < self._batch_size:
            fresh = self.pull(free)
            if not fresh:
                break
            place(fresh, 0)
        if not count.sum():
            raise StopIteration
        self.commit(waiting)
        return self.batch([sorted(rows, key=lambda x: x[0]) for rows in placed], len(waiting))

    def commit(self, waiting: list[tuple[int, dict[str, Any]]]) -> None:
        """End a batch: `waiting` are the rows read so far that were not placed; the state moves past the rest."""
        waiting.sort(key=lambda x: x[0])
        self._waiting = waiting
        self._marks.append((self._read, self._parent.get_state()))
        oldest = waiting[0][0] if waiting else self._read
        while len(self._marks) > 1 and self._marks[1][0] <= oldest:
            self._marks.pop(0)

    def batch(self, placed: list[list[tuple[Any, dict[str, Any]]]], deferred: int,
              template: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """The budgeted batch of each device's rows ((key, row) pairs, in order), padded with empty rows
        (`template` when this iterator has read none), with the host-side count of waiting rows; with `keep_slots`
        the rows keep their slots."""
        template = self._template if self._template is not None else template
        per_device = self._batch_size // self._n_devices
        rows = [r for device_rows in placed for r in [x[1] for x in device_rows]
                + [template] * (per_device - len(device_rows))]
        if self._keep_slots:
            return {**token_arrays(rows, self._pad_id), **slot_arrays(rows, self._anyres),
                    "deferred_rows": np.int64(deferred)}
        pixels, index = pack_tiles(np.stack([r["pixel_values"] for r in rows]),
                                   np.stack([r["pixel_values_segment_ids"] for r in rows]) > 0,
                                   self._n_devices, self._budget)
        return {  # the budgeted batch contract of `data.batch`, plus the host-side count of waiting rows
            **token_arrays(rows, self._pad_id),
            "pixel_values": pixels.astype(DTYPES["pixel_values"], copy=False),
            "tile_index": index,
            "deferred_rows": np.int64(deferred),
        }

    def get_state(self) -> dict[str, Any]:
        first, state = self._marks[0]
        return {"parent": state, "read": self._read - first, "waiting": [o - first for o, _ in self._waiting]}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._read, self._exhausted, self._marks = 0, False, [(0, state["parent"])]
        keep = set(state["waiting"])
        self._waiting = [x for x in self.pull(int(state["read"])) if x[0] in keep]


def check_budget(batch_size: int, n_devices: int, budget: int, max_tiles: int) -> None:
    """Fail in one line when `batch_size` rows cannot be split over `n_devices` or a full row exceeds `budget`."""
    if batch_size < 1 or n_devices < 1 or batch_size % n_devices:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of the number of devices "
                         f"({n_devices}) that share it")
    if budget < max_tiles:
        raise ValueError(f"tile_budget={budget} must be >= max_tiles={max_tiles} (a full row must fit on a device)")


class BudgetedBatchIterDataset(grain.IterDataset):
    """Packed rows -> batches of exactly `batch_size` rows over `n_devices` devices, each device's rows holding at
    most `budget` tiles in total; rows that do not fit wait for the next batch (module docstring). Each batch
    carries `deferred_rows`: how many rows wait after it."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, n_devices: int, budget: int, max_tiles: int,
                 pad_id: int = 0):
        super().__init__(parent)
        check_budget(batch_size, n_devices, budget, max_tiles)
        self._args = (batch_size, n_devices, budget, pad_id)

    def __iter__(self) -> BudgetedBatchIterator:
        return BudgetedBatchIterator(self._parent.__iter__(), *self._args)
