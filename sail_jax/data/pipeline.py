"""The training input pipeline on Grain: sources -> per-sample transform -> mixture -> workers -> skip accounting
-> stream packing -> visual packing -> batches.

    per dataset: MapDataset.source(JSONL | ArrayRecord).shuffle(seed).repeat(epochs)[process::processes]
                 .map(SampleTransform).to_iter_dataset()
    IterDataset.mix(datasets, weights)            dataset-level resampling by weight, deterministic
    .mp_prefetch(num_workers)                     image decoding, tiling, tokenization in worker processes
    SkipBadSamplesIterDataset                     counts/logs/filters skip markers in the main process
    Grain BestFitPackIterDataset                  rows of seq_len tokens and max_tiles tiles (packing.pack_rows)
    VisualBatchIterDataset                        batch_size rows, tile-balanced over the local devices, or with
    | BudgetedBatchIterDataset                    `tile_budget`: each device's rows hold <= budget tiles, packed
                                                  into its budget slots; rows over it wait (data.tile_budget)
    ThreadPrefetchIterDataset                     a few batches ahead, in a thread
With several data shards and `tile_balance` "global" (`grain_data`), the batching stage is instead one placement
of all shards' rows over all their devices (`data.global_balance`), with or without a tile budget.

Each step yields the process-local part of the global batch, as the batch contract (`data.batch`) defines it:
input_ids, segment_ids, positions, loss_mask [B,T] int32; pixel_values [B,max_tiles,3,S,S] float32; tile_mask
[B,max_tiles] bool (with a tile budget: pixel_values [devices*budget,3,S,S] and tile_index [devices,budget,2]
instead of the slots and mask; a SAIL-ViT-AnyRes model: each row's native-resolution images packed into
`max_patches` patch slots instead, the `anyres_*` keys), plus with a budget or global placement the host-side count
`deferred_rows` (over all shards when global). The iterator is a Grain `DatasetIterator` (get_state/set_state,
`grain.checkpoint.CheckpointSave/Restore` under Orbax). Mixture weights apply to records as read, i.e. before bad
samples are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import grain
import numpy as np

from sail_jax.config import PAD_TOKEN_ID, ModelConfig, VisionConfig
from sail_jax.data.batch import ALL_DTYPES, batch_shapes, local_rows
from sail_jax.data.elastic import ShardedIterator, owned_shards
from sail_jax.data.global_balance import GlobalBudgetedIterator, local_exchange, process_exchange
from sail_jax.data.packing import SkipBadSamplesIterDataset, VisualBatchIterDataset, pack_rows, row_tiles
from sail_jax.data.sources import open_source
from sail_jax.data.tile_budget import (
    BudgetedBatchIterator,
    BudgetedBatchIterDataset,
    auto_budget,
    check_budget,
)
from sail_jax.data.transforms import SampleTransform
from sail_jax.data.video import DEFAULT_NUM_FRAMES
from sail_jax.files import parent_dir

log = logging.getLogger("sail_jax.data")


def default_num_workers() -> int:
    """2 worker processes on hosts with spare cores; none where the trainer would have to share one or two cores
    (spawning workers there costs more than it gives; measured in benchmarks/packing.py)."""
    return 2 if (os.cpu_count() or 1) >= 4 else 0


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One component of the mixture. `image_root` (the root of image and video paths) defaults to the data file's
    directory; a video record's frames are `num_frames` sampled uniformly, or with `fps` one every video_fps / fps
    frames (VLMEvalKit's two modes)."""

    path: str
    weight: float = 1.0
    image_root: str | None = None
    name: str | None = None
    num_frames: int = DEFAULT_NUM_FRAMES
    fps: float | None = None

    @property
    def key(self) -> str:
        return self.name or Path(self.path).stem


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything the pipeline needs.

    Rows: `seq_len` tokens and `max_tiles` tile slots each; `batch_size` rows per step in this process, tile-
    balanced over `num_devices` (the devices this process feeds). Samples: images tiled with up to `max_num` tiles
    (+ thumbnail) at `image_size` pixels (None: the tokenizer dir's preprocessor_config.json, 448), `over_long`
    "drop" | "truncate", `loss_on` "thought_and_answer" | "conditional" (Think-Fusion SFT) | "answer" (which
    response tokens are targets: `transforms`), `system_prompt` (None: the SAIL-VL2 default, "": none). Image
    paths stay under the image root unless `allow_absolute_image_paths` (trusted data). Packing: `packer`
    "best_fit" | "first_fit" over `num_packing_bins` bins. Order: shuffled per epoch with `seed`; `num_epochs`
    None repeats forever, else the mixture stops when its first dataset runs out. Throughput:
    `num_workers` processes (0: none) with `worker_buffer_size` samples each, `read_threads` / `read_buffer_size`
    per reader, `prefetch_batches` finished batches ahead. Bad data: a dataset whose skipped fraction exceeds
    `max_skip_fraction` (checked from `min_samples_for_skip_check` records on) stops the run.
    Tile budget (`tile_budget`): None runs the ViT on every slot; an int or "auto" packs each device's tiles into
    that many slots (>= max_tiles), "auto" choosing it once as the `tile_budget_quantile` of the balanced
    per-device tile loads of the first `CALIBRATION_BATCHES` batches of process 0's rows (the same on every host).
    With several data shards (`grain_data`), `tile_balance` "global" places the rows of all shards over the devices
    of all shards in one assignment (`data.global_balance`; a shard sends at most `max_migrants` rows a step to
    other shards' devices, None: a quarter of its rows, at least 1), with or without a tile budget (without one
    it balances tile or AnyRes patch loads), "process" balances each shard on its own; "auto" (the default) is
    "global" when the migrant rows of one step (every shard's buffer, which every process receives) take at most
    `GLOBAL_EXCHANGE_MAX_BYTES`, else "process" (`resolve_tile_balance`).
    Video: `frame_cache_dir` keeps decoded, resized frames on disk so later epochs do not decode again
    (`data.frame_cache`; None: decode every time). AnyRes: `anyres` (the model's vision config, set by `grain_data`
    for an AnyRes model) keeps images at native resolution; rows then hold `max_patches` patches (a static budget,
    a multiple of 4) instead of `max_tiles` tiles, and batches are patch-balanced.
    """

    datasets: tuple[DatasetSpec, ...]
    tokenizer_dir: str
    seq_len: int = 4096
    batch_size: int = 8
    max_tiles: int = 16
    max_num: int = 12
    image_size: int | None = None
    over_long: str = "drop"
    loss_on: str = "thought_and_answer"
    system_prompt: str | None = None
    packer: str = "best_fit"
    num_packing_bins: int = 32
    num_devices: int | None = None
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    num_workers: int = dataclasses.field(default_factory=default_num_workers)
    worker_buffer_size: int = 2
    read_threads: int = 2
    read_buffer_size: int = 16
    prefetch_batches: int = 2
    max_skip_fraction: float = 0.05
    min_samples_for_skip_check: int = 100
    allow_absolute_image_paths: bool = False
    frame_cache_dir: str | None = None
    tile_budget: int | str | None = None
    tile_budget_quantile: float = 0.9
    tile_balance: str = "auto"
    max_migrants: int | None = None
    anyres: VisionConfig | None = None
    max_patches: int = 16384

    def __post_init__(self):
        object.__setattr__(self, "datasets", tuple(
            d if isinstance(d, DatasetSpec) else DatasetSpec(**d) for d in self.datasets))
        if not self.datasets:
            raise ValueError("DataConfig.datasets is empty")
        keys = [d.key for d in self.datasets]
        if len(set(keys)) != len(keys):
            raise ValueError(f"dataset names must be unique, got {keys}; set DatasetSpec.name")
        for d in self.datasets:
            if not d.weight > 0:
                raise ValueError(f"dataset {d.path}: weight must be > 0, got {d.weight}")
            if d.num_frames < 1 or (d.fps is not None and not d.fps > 0):
                raise ValueError(f"dataset {d.path}: num_frames must be >= 1 and fps > 0, got "
                                 f"num_frames={d.num_frames}, fps={d.fps}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        budget = self.tile_budget
        if not (budget is None or budget == "auto" or (isinstance(budget, int) and budget >= self.max_tiles)):
            raise ValueError(f"tile_budget={budget!r}: expected None, 'auto' or an int >= max_tiles={self.max_tiles}")
        if not 0 < self.tile_budget_quantile <= 1:
            raise ValueError(f"tile_budget_quantile={self.tile_budget_quantile} must be in (0, 1]")
        if self.tile_balance not in TILE_BALANCES:
            raise ValueError(f"tile_balance={self.tile_balance!r}: expected one of {TILE_BALANCES}")
        if self.max_migrants is not None and self.max_migrants < 0:
            raise ValueError(f"max_migrants must be >= 0, got {self.max_migrants}")
        if self.anyres is not None and budget is not None:
            raise ValueError("tile_budget applies to tiles; an AnyRes model packs max_patches patches per row")
        if self.max_patches < 4 or self.max_patches % 4:
            raise ValueError(f"max_patches must be a positive multiple of 4, got {self.max_patches}")


def _component(cfg: DataConfig, index: int, process_index: int, process_count: int) -> grain.IterDataset:
    spec = cfg.datasets[index]
    source = open_source(spec.path)
    if len(source) == 0:
        raise ValueError(f"dataset {spec.path} has no records")
    ds = grain.MapDataset.source(source)
    if cfg.shuffle:
        ds = ds.shuffle(seed=int(np.random.SeedSequence([cfg.seed, index]).generate_state(1)[0]))
    ds = ds.repeat(cfg.num_epochs)[process_index::process_count]
    transform = SampleTransform(
        tokenizer_dir=str(cfg.tokenizer_dir), image_root=str(spec.image_root or parent_dir(spec.path)),
        dataset=index, seq_len=cfg.seq_len, max_tiles=cfg.max_tiles, max_num=cfg.max_num,
        image_size=cfg.image_size, over_long=cfg.over_long, loss_on=cfg.loss_on,
        system_prompt=cfg.system_prompt, allow_absolute_image_paths=cfg.allow_absolute_image_paths,
        num_frames=spec.num_frames, fps=spec.fps,
        frame_cache_dir=None if cfg.frame_cache_dir is None else str(cfg.frame_cache_dir),
        anyres=cfg.anyres, max_patches=cfg.max_patches,
    )
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size)
    return ds.map(transform).to_iter_dataset(read)


def sample_dataset(cfg: DataConfig, process_index: int | None = None,
                   process_count: int | None = None) -> grain.IterDataset:
    """The mixed, worker-prefetched stream of transformed samples (incl. skip markers) of this process."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    parts = {d.key: _component(cfg, i, process_index, process_count) for i, d in enumerate(cfg.datasets)}
    if len(parts) == 1:
        ds = next(iter(parts.values()))
    else:
        ds = grain.IterDataset.mix(parts, {d.key: d.weight for d in cfg.datasets})
    if cfg.num_workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; our CLI does not parse them
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    return ds


def row_dataset(cfg: DataConfig, process_index: int | None = None,
                process_count: int | None = None) -> grain.IterDataset:
    """The packed rows of this process, before batching: what `train.epochs` counts (`data.epochs`)."""
    ds = sample_dataset(cfg, process_index, process_count)
    ds = SkipBadSamplesIterDataset(ds, [d.path for d in cfg.datasets], cfg.max_skip_fraction,
                                   cfg.min_samples_for_skip_check)
    return pack_rows(ds, cfg.seq_len, cfg.max_tiles, cfg.num_packing_bins, cfg.seed, cfg.packer,
                     None if cfg.anyres is None else cfg.max_patches)


def batch_devices(cfg: DataConfig) -> int:
    """The devices one process's batch is balanced over: `cfg.num_devices`, else `jax.local_device_count()` when
    it divides the batch, else 1 (no tile balancing)."""
    if cfg.num_devices is not None:
        return cfg.num_devices
    import jax

    local = jax.local_device_count()
    return local if cfg.batch_size % local == 0 else 1


TILE_BALANCES = ("auto", "global", "process")
# "auto" tile balance: global placement only while one step's migrant rows, which reach every process, stay this
# small (a pod's full-size rows are tens of MB each: with many shards the exchange would outweigh what it balances).
GLOBAL_EXCHANGE_MAX_BYTES = 256 << 20

CALIBRATION_BATCHES = 16  # batches of rows that an "auto" tile budget is chosen from


def resolve_tile_budget(cfg: DataConfig, process_count: int | None = None) -> int | None:
    """The static tile budget per device: `cfg.tile_budget` as given, or for "auto" chosen from the first
    `CALIBRATION_BATCHES` batches of process 0's packed rows (so every process computes the same number)."""
    if cfg.tile_budget != "auto":
        return cfg.tile_budget
    it = iter(row_dataset(cfg, 0, process_count if process_count is not None else _process_count()))
    loads = [row_tiles(row) for _, row in zip(range(CALIBRATION_BATCHES * cfg.batch_size), it)]
    batches = [loads[i:i + cfg.batch_size] for i in range(0, len(loads) - cfg.batch_size + 1, cfg.batch_size)]
    budget = auto_budget(batches, batch_devices(cfg), cfg.tile_budget_quantile, cfg.max_tiles)
    log.info("tile budget: %d tiles per device (quantile %g of %d batches' balanced loads)", budget,
             cfg.tile_budget_quantile, len(batches))
    return budget


def _process_count() -> int:
    import jax

    return jax.process_count()


def build_dataset(cfg: DataConfig, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
    """The batch dataset of this process (module docstring); `iter()` it for a checkpointable iterator.

    `process_index`/`process_count` default to jax's; the batch is balanced over `batch_devices(cfg)`."""
    n_devices, rows = batch_devices(cfg), row_dataset(cfg, process_index, process_count)
    budget = resolve_tile_budget(cfg, process_count)
    if budget is None:
        ds = VisualBatchIterDataset(rows, cfg.batch_size, n_devices, PAD_TOKEN_ID, cfg.anyres)
    else:
        ds = BudgetedBatchIterDataset(rows, cfg.batch_size, n_devices, budget, cfg.max_tiles, PAD_TOKEN_ID)
    if cfg.prefetch_batches:  # packing and batching run in a thread, overlapping the training step
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch_batches)
    return FingerprintedIterDataset(ds, data_fingerprint(cfg))


# The DataConfig fields that decide which samples arrive in which order (not the throughput ones: workers, threads,
# buffers may change between runs).
STREAM_FIELDS = ("datasets", "tokenizer_dir", "seq_len", "batch_size", "max_tiles", "max_num", "image_size",
                 "over_long", "loss_on", "system_prompt", "packer", "num_packing_bins", "seed", "shuffle",
                 "num_epochs", "allow_absolute_image_paths")


# With a tile budget these decide the batches too (left out without one, so older checkpoints still match).
BUDGET_FIELDS = ("tile_budget", "tile_budget_quantile")
GLOBAL_BALANCE_FIELDS = ("tile_balance", "max_migrants")  # rows placed over several shards' devices


def data_fingerprint(cfg: DataConfig, global_balance: bool = False) -> dict[str, Any]:
    """The stream-defining fields of `cfg` as JSON values, stored with the iterator state in every checkpoint (the
    tile-budget, global-balance and AnyRes ones only when on, so older checkpoints still match; `global_balance`:
    rows placed over several shards' devices, where a per-shard checkpoint must not match)."""
    fields = STREAM_FIELDS + (BUDGET_FIELDS if cfg.tile_budget is not None else ())
    fields += GLOBAL_BALANCE_FIELDS if global_balance else ()
    out = {k: dataclasses.asdict(cfg)[k] if k == "datasets" else getattr(cfg, k) for k in fields}
    if cfg.anyres is not None:
        out.update(anyres=dataclasses.asdict(cfg.anyres), max_patches=cfg.max_patches)
    return json.loads(json.dumps(out))


class DataConfigMismatch(ValueError):
    """A checkpoint's iterator state was written for another data configuration."""


class _FingerprintedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, fingerprint: dict[str, Any]):
        super().__init__(parent)
        self._fingerprint = fingerprint

    def __next__(self) -> Any:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"data_config": self._fingerprint, "pipeline": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("data_config")
        if saved is None:
            raise DataConfigMismatch("the checkpoint's data iterator state has no data configuration (written by "
                                     "an older version); resume it with that version or start a new workdir")
        if saved != self._fingerprint:
            changed = ", ".join(f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in self._fingerprint.items()
                                if saved.get(k) != v)
            raise DataConfigMismatch(f"the data configuration differs from the checkpoint's ({changed}); resume "
                                     f"with the data settings the run was started with, or start a new workdir")
        self._parent.set_state(state["pipeline"])


class FingerprintedIterDataset(grain.IterDataset):
    """The outermost stage: the iterator state carries `data_fingerprint(cfg)`, and restoring a state written for
    another configuration fails in one line naming the changed fields (instead of a KeyError deep in Grain, or a
    silently different stream)."""

    def __init__(self, parent: grain.IterDataset, fingerprint: dict[str, Any]):
        super().__init__(parent)
        self._fingerprint = fingerprint

    def __iter__(self) -> _FingerprintedIterator:
        return _FingerprintedIterator(self._parent.__iter__(), self._fingerprint)


def grain_data(
    *,
    cfg: ModelConfig,
    global_batch_size: int,
    seq_len: int,
    process_index: int,
    process_count: int,
    seed: int,
    datasets: Any,
    tokenizer_dir: str,
    data_shards: int | None = None,
    **options: Any,
) -> ShardedIterator:
    """The trainer's data factory (`data.batch.DataFactory`) over this pipeline.

    The model config fixes the tile size (AnyRes: the image sizes; `max_patches` is the row budget); `datasets` is
    a sequence of `DatasetSpec`s or dicts (`{"path": ..., "weight": ...}`); other `DataConfig` fields come as
    keyword options (e.g. from gin).
    `data_shards` (default: the process count) fixes how many pipelines the data is split into for the whole run:
    each process reads a block of them, so the run can resume on any process count that divides it with the same
    global batches (`data.elastic`).
    """
    shards = process_count if data_shards is None else data_shards
    if data_shards is not None and (data_shards < 1 or global_batch_size % data_shards):
        raise ValueError(f"grain_data.data_shards={data_shards} must be >= 1 and divide the global batch size "
                         f"{global_batch_size}")
    shard_rows = local_rows(global_batch_size, shards)
    data_cfg = DataConfig(
        datasets=tuple(datasets), tokenizer_dir=str(tokenizer_dir), seq_len=seq_len, batch_size=shard_rows,
        image_size=cfg.vision.image_size, seed=seed, anyres=cfg.vision if cfg.vision.anyres else None, **options,
    )
    mine = owned_shards(shards, process_index, process_count)
    if data_cfg.num_devices is None:  # tile balancing over the devices that take each shard's rows
        import jax

        devices, rem = divmod(jax.local_device_count(), len(mine))
        data_cfg = dataclasses.replace(data_cfg, num_devices=devices if not rem and shard_rows % devices == 0 else 1)
    if shards > 1 and resolve_tile_balance(data_cfg, cfg, shards) == "global":
        return global_balanced(dataclasses.replace(data_cfg, tile_balance="global"), mine, shards, process_count)
    return ShardedIterator(lambda v: iter(build_dataset(data_cfg, v, shards)), mine, shards)


def row_slots(cfg: DataConfig) -> int:
    """The vision slots of a packed row: tiles, or AnyRes patches."""
    return cfg.max_tiles if cfg.anyres is None else cfg.max_patches


def migrants_per_shard(cfg: DataConfig) -> int:
    """`cfg.max_migrants`, by default a quarter of a shard's rows (at least 1)."""
    return max(1, cfg.batch_size // 4) if cfg.max_migrants is None else cfg.max_migrants


def resolve_tile_balance(cfg: DataConfig, model: ModelConfig, num_shards: int) -> str:
    """"global" or "process" for `cfg.tile_balance` over `num_shards` shards: "auto" is "global" when one step's
    migrant buffer (num_shards x max_migrants full rows) fits GLOBAL_EXCHANGE_MAX_BYTES. The choice never depends
    on the process count, so a resumed run on another count places rows as before."""
    if cfg.tile_balance != "auto":
        return cfg.tile_balance
    row = sum(math.prod(s) * np.dtype(ALL_DTYPES[k]).itemsize
              for k, s in batch_shapes(model, 1, cfg.seq_len, row_slots(cfg)).items())
    exchange = num_shards * migrants_per_shard(cfg) * row
    mode = "global" if exchange <= GLOBAL_EXCHANGE_MAX_BYTES else "process"
    log.info("tile_balance auto -> %s (a step's migrant rows: %.0f MB over %d shards)", mode, exchange / 2**20,
             num_shards)
    return mode


def global_balanced(cfg: DataConfig, shards: range, num_shards: int, process_count: int) -> GlobalBudgetedIterator:
    """The batches of data shards `shards` (of `num_shards`, `cfg.batch_size` rows each), their rows placed over the
    devices of all shards (`data.global_balance`): on the tile budget, or without one (fixed tile slots or AnyRes
    patch slots) on rows per device x slots per row, which only balances. Row packing runs `prefetch_batches`
    batches ahead in a thread per shard, the placement and its collectives in the caller's thread."""
    n, budget = batch_devices(cfg), resolve_tile_budget(cfg, num_shards)
    fingerprint = data_fingerprint(cfg, global_balance=True)
    if budget is None:
        slots = row_slots(cfg)
        check_budget(cfg.batch_size, n, slots, slots)
        budget, slack = cfg.batch_size // n * slots, slots // 8  # a light row stays home within 1/8 of a full row
    else:
        check_budget(cfg.batch_size, n, budget, cfg.max_tiles)
        slack = None
    rows = {}
    for v in shards:
        ds = row_dataset(cfg, v, num_shards)
        if cfg.prefetch_batches:
            ds = grain.experimental.ThreadPrefetchIterDataset(
                ds, prefetch_buffer_size=cfg.prefetch_batches * cfg.batch_size)
        rows[v] = BudgetedBatchIterator(iter(ds), cfg.batch_size, n, budget, PAD_TOKEN_ID,
                                        keep_slots=cfg.tile_budget is None, anyres=cfg.anyres)
    migrants = migrants_per_shard(cfg)
    return GlobalBudgetedIterator(lambda v: _FingerprintedIterator(rows[v], fingerprint), rows, shards, num_shards,
                                  cfg.batch_size, n, budget, migrants,
                                  process_exchange if process_count > 1 else local_exchange, slack)
