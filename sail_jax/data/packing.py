"""Main-process stages of the pipeline: bad-sample accounting, stream packing, visual packing into batches.

* `SkipBadSamplesIterDataset` drops the transform's skip markers and counts them per dataset and reason, with the
  truncated samples (the counts live in the iterator state, so they survive checkpoints and are exact with worker
  processes), logs each with its file and line, and fails with a clear error naming the data file when a dataset's
  skip fraction passes a limit.
* `pack_rows` is Grain's best-fit (or first-fit) multi-bin packer with the tiles as a second packed feature: a
  row holds at most `seq_len` tokens AND `max_tiles` tiles, both placed in sample order, so the k-th
  `<IMG_CONTEXT>` run of a row matches its k-th tiles. Grain places every sample the moment it is read (a new set
  of bins starts when it fits nowhere), so nothing waits: a sample is emitted at most `num_bins` rows after it is
  read, however long or tile-heavy (the paper's "forced inclusion" holds by construction).
* `VisualBatchIterDataset` takes `batch_size` rows per step and orders them so that the contiguous blocks of
  rows that the batch sharding gives each data-parallel device carry balanced tile counts (visual packing).

SAIL-ViT-AnyRes (`max_patches` given): the second packed budget is `max_patches` PATCHES per row (the samples'
`anyres_patches`, with their `anyres_grids` packed alongside, at most max_patches / 4 images), rows are balanced by
patch count, and each row's images become the packed arrays of the batch contract (`batch.anyres_row`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from sail_jax.config import VisionConfig
from sail_jax.data.batch import DTYPES, anyres_row
from sail_jax.data.elastic import SHARDS
from sail_jax.data.transforms import SKIP_REASONS

log = logging.getLogger("sail_jax.data")

PACKERS = {"best_fit": grain.experimental.BestFitPackIterDataset,
           "first_fit": grain.experimental.FirstFitPackIterDataset}


def row_tiles(row: Mapping[str, Any], key: str = "pixel_values") -> int:
    """Real tiles (`key` "anyres_patches": AnyRes patches) of a packed row (`pack_rows` output)."""
    return int((row[f"{key}_segment_ids"] > 0).sum())


def empty_row(like: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A row of no tokens and no images shaped like packed row `like`: the filler that keeps batch shapes static."""
    return {k: np.zeros_like(v) for k, v in like.items() if isinstance(v, np.ndarray)}


def token_arrays(rows: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, np.ndarray]:
    """The token keys of the batch contract (`data.batch`, in its key order) stacked from packed rows; input_ids
    outside every segment become `pad_id`."""
    stack = lambda grain_key, key: np.stack([r[grain_key] for r in rows]).astype(DTYPES[key], copy=False)
    segment_ids = stack("input_ids_segment_ids", "segment_ids")
    return {"input_ids": np.where(segment_ids > 0, stack("input_ids", "input_ids"), DTYPES["input_ids"](pad_id)),
            "segment_ids": segment_ids, "positions": stack("input_ids_positions", "positions"),
            "loss_mask": stack("loss_mask", "loss_mask")}


def vision_key(anyres: VisionConfig | None) -> str:
    """The packed key whose real slots are a row's vision load: tiles, or AnyRes patches."""
    return "pixel_values" if anyres is None else "anyres_patches"


def slot_arrays(rows: Sequence[Mapping[str, Any]], anyres: VisionConfig | None) -> dict[str, np.ndarray]:
    """The vision keys of the batch contract for rows that keep their slots: pixel_values + tile_mask, or with
    `anyres` each row's packed AnyRes images (`batch.anyres_row`), stacked."""
    if anyres is None:
        pixels = np.stack([r["pixel_values"] for r in rows]).astype(DTYPES["pixel_values"], copy=False)
        return {"pixel_values": pixels, "tile_mask": np.stack([r["pixel_values_segment_ids"] for r in rows]) > 0}
    out = []
    for r in rows:
        n = row_tiles(r, "anyres_patches")
        grids = r["anyres_grids"][r["anyres_grids_segment_ids"] > 0]
        out.append(anyres_row(r["anyres_patches"][:n], grids, anyres, len(r["anyres_patches"])))
    return {k: np.stack([o[k] for o in out]) for k in out[0]}


class _SkipBadSamplesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, files: Sequence[str], max_skip_fraction: float,
                 min_samples: int):
        super().__init__(parent)
        self._files, self._max_fraction, self._min_samples = list(files), max_skip_fraction, min_samples
        self._seen = [0] * len(files)
        self._truncated = [0] * len(files)
        self._skipped = {reason: [0] * len(files) for reason in SKIP_REASONS}

    def __next__(self) -> dict[str, Any]:
        while True:
            element = next(self._parent)
            reason = element.get("skip")
            d = element["info"]["dataset"] if reason is None else element["dataset"]
            self._seen[d] += 1
            if reason is None:
                self._truncated[d] += bool(element["info"].get("truncated"))
                return element
            self._skipped[reason][d] += 1
            log.warning("skipping %s (%s): %s", element["where"], reason, element["error"])
            self._check(d)

    def _check(self, d: int) -> None:
        skipped, seen = sum(counts[d] for counts in self._skipped.values()), self._seen[d]
        if seen >= self._min_samples and skip_fraction_lower_bound(skipped, seen) > self._max_fraction:
            detail = ", ".join(f"{r}: {c[d]}" for r, c in self._skipped.items() if c[d])
            raise ValueError(
                f"dataset {self._files[d]}: {skipped} of {seen} samples were unusable ({detail}), more than the "
                f"allowed fraction {self._max_fraction:g} (with 99.9% confidence); fix the data (see the warnings "
                f"above for file and line) or raise max_skip_fraction"
            )

    def get_state(self) -> dict[str, Any]:
        counts = {"seen": list(self._seen), "truncated": list(self._truncated),
                  **{r: list(c) for r, c in self._skipped.items()}}
        return {"parent": self._parent.get_state(), "skip_counts": counts}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        counts = state["skip_counts"]
        self._seen, self._truncated = list(counts["seen"]), list(counts["truncated"])
        # A reason added since the checkpoint was written (e.g. the video ones) starts at zero.
        self._skipped = {r: list(counts.get(r, [0] * len(self._files))) for r in SKIP_REASONS}


def skip_fraction_lower_bound(skipped: int, seen: int, z: float = 3.0) -> float:
    """One-sided lower Wilson bound (z=3: 99.87%) of a dataset's true bad-record fraction after `seen` records.

    The guard compares this bound, not the running fraction, with `max_skip_fraction`: the running fraction of a
    4%-bad dataset passes 5% by chance early on (4 bad in the first 100 is the mean; 6 happens every third run),
    while the bound passes it only once the data is convincingly worse (a 10%-bad dataset after ~200 records)."""
    if seen == 0:
        return 0.0
    p, z2 = skipped / seen, z * z
    centre = p + z2 / (2 * seen)
    spread = z * math.sqrt(p * (1 - p) / seen + z2 / (4 * seen * seen))
    return max(0.0, (centre - spread) / (1 + z2 / seen))


def skip_totals(state: Any) -> dict[str, int]:
    """{"skipped_REASON": n, "truncated_samples": n} summed over datasets, from a pipeline iterator state (the
    `skip_counts` of the SkipBadSamples stage, however deep the stages above nest it); {} without one."""
    if isinstance(state, Mapping):
        if state.get("elastic") == SHARDS:  # one pipeline per data shard (`data.elastic`): their sum
            totals: dict[str, int] = {}
            for shard in state["shards"].values():
                for k, n in skip_totals(shard).items():
                    totals[k] = totals.get(k, 0) + n
            return totals
        if "skip_counts" in state:
            counts = state["skip_counts"]
            return {**{f"skipped_{r}": int(sum(counts[r])) for r in SKIP_REASONS},
                    "truncated_samples": int(sum(counts["truncated"]))}
        children = state.values()
    elif isinstance(state, (list, tuple)):
        children = state
    else:
        return {}
    for child in children:
        if found := skip_totals(child):
            return found
    return {}


class SkipBadSamplesIterDataset(grain.IterDataset):
    """Filters skip markers with per-dataset, per-reason counts (see module docstring).

    Its iterator state is `{"parent": ..., "skip_counts": {"seen": [...], "truncated": [...], REASON: [...]}}`,
    one count per dataset; a packed pipeline's state holds it as of its restart point (the packer replays its
    current bins on restore), i.e. up to one set of packing bins behind the live counts."""

    def __init__(self, parent: grain.IterDataset, files: Sequence[str], max_skip_fraction: float = 0.05,
                 min_samples: int = 100):
        super().__init__(parent)
        if not 0 <= max_skip_fraction <= 1:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self._files, self._max_fraction, self._min_samples = list(files), max_skip_fraction, min_samples

    def __iter__(self) -> _SkipBadSamplesIterator:
        return _SkipBadSamplesIterator(self._parent.__iter__(), self._files, self._max_fraction, self._min_samples)


def pack_rows(parent: grain.IterDataset, seq_len: int, max_tiles: int, num_bins: int, seed: int,
              packer: str = "best_fit", max_patches: int | None = None) -> grain.IterDataset:
    """Grain multi-bin packing of samples into rows of `seq_len` tokens and `max_tiles` tile slots.

    Emits input_ids, loss_mask [T], pixel_values [max_tiles,3,S,S], Grain's input_ids_segment_ids (1, 2, … per
    sample, 0 = padding) and input_ids_positions (restarting at 0 per sample), pixel_values_segment_ids (0 = empty
    slot) and `info`: the per-sample info dicts of the row, in row order. Padding is zeros: Grain allocates its
    bins with np.zeros, so untouched tile slots cost no memory (a padding value would fill them). With
    `max_patches` (AnyRes) anyres_patches [max_patches, p*p*3] and anyres_grids [max_patches/4, 2] (with their
    `_segment_ids`) take the place of pixel_values."""
    if packer not in PACKERS:
        raise ValueError(f"packer={packer!r}; expected one of {sorted(PACKERS)}")
    vision = ({"pixel_values": max_tiles} if max_patches is None
              else {"anyres_patches": max_patches, "anyres_grids": max_patches // 4})
    return PACKERS[packer](
        parent,
        length_struct={"input_ids": seq_len, "loss_mask": seq_len, **vision},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=True,
        meta_features=("loss_mask", "info"),
    )


def balance_rows(tiles_per_row: Sequence[int], n_devices: int) -> np.ndarray:
    """Row order that balances tiles over devices that take contiguous blocks of rows_per_device = B/n rows.

    Longest-processing-time greedy with equal cardinality: rows by decreasing tiles, each to the device with the
    fewest tiles among those with a free row slot. Returns the permutation (device 0's rows first)."""
    tiles = np.asarray(tiles_per_row)
    if n_devices < 1 or len(tiles) % n_devices:
        raise ValueError(f"{len(tiles)} rows cannot be split evenly over {n_devices} device(s)")
    per_device = len(tiles) // n_devices
    load, rows = np.zeros(n_devices, np.int64), [[] for _ in range(n_devices)]
    for r in np.argsort(-tiles, kind="stable"):
        open_devices = [d for d in range(n_devices) if len(rows[d]) < per_device]
        d = min(open_devices, key=lambda k: (load[k], k))
        rows[d].append(int(r))
        load[d] += tiles[r]
    return np.array([r for device_rows in rows for r in sorted(device_rows)], np.int64)


def batch_stats(batch: Mapping[str, np.ndarray], n_devices: int = 1) -> dict[str, float]:
    """Packing and visual-packing metrics of one batch (for logging): real-token fraction, samples, target tokens,
    tiles, and tiles per device (max, mean, max/mean) for devices taking contiguous row blocks."""
    seg = np.asarray(batch["segment_ids"])
    tile_mask = np.asarray(batch["tile_mask"])
    per_device = tile_mask.reshape(n_devices, -1).sum(axis=1)
    mean = float(per_device.mean())
    return {
        "real_token_fraction": float((seg > 0).mean()),
        "samples": float(seg.max(axis=1).sum()),
        "target_tokens": float(np.asarray(batch["loss_mask"]).sum()),
        "tiles": float(tile_mask.sum()),
        "tiles_per_device_max": float(per_device.max()),
        "tiles_per_device_mean": mean,
        "tile_balance": float(per_device.max()) / mean if mean else 1.0,
    }


class _VisualBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int, n_devices: int, pad_id: int,
                 anyres: VisionConfig | None):
        super().__init__(parent)
        self._batch_size, self._n_devices, self._pad_id, self._anyres = batch_size, n_devices, pad_id, anyres

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for _ in range(self._batch_size):
            try:
                rows.append(next(self._parent))
            except StopIteration:
                if not rows:
                    raise
                break
        if len(rows) < self._batch_size:  # end of a finite stream: empty rows keep the shapes static
            rows += [empty_row(rows[0])] * (self._batch_size - len(rows))
        order = balance_rows([row_tiles(r, vision_key(self._anyres)) for r in rows], self._n_devices)
        rows = [rows[i] for i in order]
        return {**token_arrays(rows, self._pad_id), **slot_arrays(rows, self._anyres)}

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state)


class VisualBatchIterDataset(grain.IterDataset):
    """Packed rows -> batches of exactly `batch_size` rows, tile-balanced over `n_devices` (module docstring);
    with `anyres` (the model's vision config) patch-balanced, the rows' images packed as the batch contract says.

    Each batch is built from the next `batch_size` rows only, so the iterator state is just the parent's."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, n_devices: int = 1, pad_id: int = 0,
                 anyres: VisionConfig | None = None):
        super().__init__(parent)
        if batch_size < 1 or n_devices < 1 or batch_size % n_devices:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the number of devices "
                             f"({n_devices}) that share it")
        self._batch_size, self._n_devices, self._pad_id, self._anyres = batch_size, n_devices, pad_id, anyres

    def __iter__(self) -> _VisualBatchIterator:
        return _VisualBatchIterator(self._parent.__iter__(), self._batch_size, self._n_devices, self._pad_id,
                                    self._anyres)
