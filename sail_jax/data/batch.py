"""The batch contract between data sources and the train step: keys, dtypes, shapes, checks and the global batch.

A data factory (`DataFactory`: the Grain pipeline's `grain_data`, `training.synthetic.synthetic_data`) yields
this process's rows of each global batch as a dict of numpy arrays:

    input_ids, segment_ids (0 = padding), positions, loss_mask   [B, T]                      int32
    pixel_values                                                 [B, max_tiles, C, S, S]     float32
    tile_mask                                                    [B, max_tiles]              bool

or, with a tile budget (`data.tile_budget`: the ViT runs on `budget` tiles per data-parallel device, not on every
slot), the tiles of each of G groups of B/G contiguous rows packed into that group's `budget` slots:

    pixel_values                                                 [G * budget, C, S, S]       float32
    tile_index  (row within the group's rows, tile k of that row; -1 = empty slot)   [G, budget, 2]   int32

G is the number of data-parallel devices (times the micro-batches of a step), so each device holds its rows and
exactly their tiles.

For a SAIL-ViT-AnyRes model (`cfg.vision.anyres`) pixel_values / tile_mask are replaced by each row's images
packed into `max_patches` patch slots, the fields of `models.anyres.PackedImages` (`ANYRES_DTYPES`, built by
`anyres_row`):

    anyres_patches [B, L, p*p*C] float32, anyres_segment_ids [B, L] int32 (image k of the row -> k + 1),
    anyres_pos_index / anyres_pos_weight [B, L, 16], anyres_rope_pos [B, L, 2], anyres_shuffle_index [B, L/4, 4],
    anyres_token_mask [B, L/4] bool

with `get_state()` / `set_state(state)` (Grain `DatasetIterator` semantics) so checkpoints store where it is
(a state marked as a global position resumes on another process count: `data.elastic`).
`to_global` assembles every process's rows into global arrays whose rows go over the data-parallel mesh axes;
`abstract_batch` is that same global batch as sharded `ShapeDtypeStruct`s, for compiling ahead of time.
Keys a pipeline adds beyond these stay on the host.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from sail_jax.config import ModelConfig, VisionConfig
from sail_jax.models.anyres import TAPS, PackedImages, pack_patches
from sail_jax.sharding import batch_sharding

DTYPES: dict[str, type] = {
    "input_ids": np.int32, "segment_ids": np.int32, "positions": np.int32, "loss_mask": np.int32,
    "pixel_values": np.float32, "tile_mask": np.bool_, "tile_index": np.int32,
}
KEYS = ("input_ids", "segment_ids", "positions", "loss_mask", "pixel_values", "tile_mask")  # fixed tile slots
TOKEN_KEYS = KEYS[:4]  # the [B, T] arrays
BUDGET_KEYS = (*TOKEN_KEYS, "pixel_values", "tile_index")  # tiles packed into a per-device budget
ANYRES_PREFIX = "anyres_"
ANYRES_DTYPES: dict[str, type] = {
    "anyres_patches": np.float32, "anyres_segment_ids": np.int32, "anyres_pos_index": np.int32,
    "anyres_pos_weight": np.float32, "anyres_rope_pos": np.float32, "anyres_shuffle_index": np.int32,
    "anyres_token_mask": np.bool_,
}
ALL_DTYPES: dict[str, type] = {**DTYPES, **ANYRES_DTYPES}
# The mesh axes the batch rows are split over (the `activation_batch` rule of `sail_jax.sharding`).
BATCH_AXES = ("data", "fsdp", "expert")


class DataFactory(Protocol):
    """`data(cfg=..., global_batch_size=..., seq_len=..., process_index=..., process_count=..., seed=...)` -> an
    iterator of this process's batches, with `get_state`/`set_state`."""

    def __call__(self, *, cfg: ModelConfig, global_batch_size: int, seq_len: int, process_index: int,
                 process_count: int, seed: int) -> Iterator[dict[str, np.ndarray]]: ...


def local_rows(global_batch_size: int, process_count: int) -> int:
    """Rows of each global batch that one process loads."""
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {process_count} processes")
    return global_batch_size // process_count


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch rows are split: the product of the data-parallel axes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_keys(batch: Mapping[str, object]) -> tuple[str, ...]:
    """The contract keys of this batch: `BUDGET_KEYS` when it carries `tile_index`, the AnyRes keys when it carries
    `anyres_patches`, else `KEYS`."""
    if "tile_index" in batch:
        return BUDGET_KEYS
    if "anyres_patches" in batch:
        return (*TOKEN_KEYS, *ANYRES_DTYPES)
    return KEYS


def batch_dtypes(cfg: ModelConfig) -> dict[str, type]:
    """The keys of a fixed-slot batch for this model and their dtypes (tiles, or AnyRes packed patches)."""
    if cfg.vision.anyres:
        return {**{k: DTYPES[k] for k in TOKEN_KEYS}, **ANYRES_DTYPES}
    return {k: DTYPES[k] for k in KEYS}


def batch_shapes(cfg: ModelConfig, rows: int, seq_len: int, max_tiles: int, tile_budget: int | None = None,
                 groups: int = 1) -> dict[str, tuple[int, ...]]:
    """The shape of each key for `rows` rows: `max_tiles` slots per row, or `tile_budget` per group of rows; for an
    AnyRes model `max_tiles` is the patch slots per row."""
    v = cfg.vision
    shapes = {k: (rows, seq_len) for k in TOKEN_KEYS}
    tile = (v.num_channels, v.image_size, v.image_size)
    if v.anyres:
        n, tok = max_tiles, max_tiles // 4
        return {**shapes, "anyres_patches": (rows, n, v.patch_size**2 * v.num_channels),
                "anyres_segment_ids": (rows, n), "anyres_pos_index": (rows, n, TAPS),
                "anyres_pos_weight": (rows, n, TAPS), "anyres_rope_pos": (rows, n, 2),
                "anyres_shuffle_index": (rows, tok, 4), "anyres_token_mask": (rows, tok)}
    if tile_budget is None:
        shapes["pixel_values"] = (rows, max_tiles, *tile)
        shapes["tile_mask"] = (rows, max_tiles)
    else:
        shapes["pixel_values"] = (groups * tile_budget, *tile)
        shapes["tile_index"] = (groups, tile_budget, 2)
    return shapes


def check_batch(batch: Mapping[str, np.ndarray], rows: int, seq_len: int, cfg: ModelConfig) -> None:
    """Fail with the offending key, shape or dtype when a process-local batch does not follow the contract (any
    number of tile slots, or any tile budget and number of groups that divides the rows; AnyRes: patch slots)."""
    keys = tuple(batch_dtypes(cfg)) if cfg.vision.anyres else batch_keys(batch)
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"data batch lacks {missing}; got keys {sorted(batch)}")
    v = cfg.vision
    pix = batch["anyres_patches"] if v.anyres else batch["pixel_values"]
    if v.anyres:
        if pix.ndim != 3 or pix.shape[1] % 4:
            raise ValueError(f"data batch['anyres_patches'] has shape {pix.shape}; expected ({rows}, max_patches "
                             f"(a multiple of 4), {v.patch_size**2 * v.num_channels})")
        shapes = batch_shapes(cfg, rows, seq_len, pix.shape[1])
    elif "tile_index" in batch:
        index = batch["tile_index"]
        if index.ndim != 3 or index.shape[-1] != 2 or not index.shape[0] or rows % index.shape[0]:
            raise ValueError(f"data batch['tile_index'] has shape {index.shape}; expected (groups, tile_budget, 2) "
                             f"with groups dividing the {rows} rows")
        shapes = batch_shapes(cfg, rows, seq_len, 0, index.shape[1], index.shape[0])
    elif pix.ndim != 5:
        raise ValueError(f"data batch['pixel_values'] has shape {pix.shape}; expected "
                         f"({rows}, max_tiles, {v.num_channels}, {v.image_size}, {v.image_size})")
    else:
        shapes = batch_shapes(cfg, rows, seq_len, pix.shape[1])
    for k, shape in shapes.items():
        if batch[k].shape != shape:
            raise ValueError(f"data batch[{k!r}] has shape {batch[k].shape}; expected {shape}")
    for k in keys:
        kind = np.dtype(ALL_DTYPES[k]).kind
        if np.dtype(batch[k].dtype).kind not in ("f" if kind == "f" else "biu"):
            raise ValueError(f"data batch[{k!r}] has dtype {batch[k].dtype}; expected {np.dtype(ALL_DTYPES[k]).name}")
    if "tile_index" in batch:
        row = np.asarray(batch["tile_index"])[..., 0]
        if (row < -1).any() or (row >= rows // row.shape[0]).any():
            raise ValueError(f"data batch['tile_index'] names rows outside [-1, {rows // row.shape[0]}) of a group")


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, global_rows: int) -> dict[str, jax.Array]:
    """Assemble the global batch from every process's rows (cast to the contract's dtypes), its rows (and tile
    groups) sharded over the data-parallel axes of the mesh."""
    keys = batch_keys(batch)
    scale = global_rows // batch["input_ids"].shape[0]  # processes
    if "tile_index" in batch and (groups := batch["tile_index"].shape[0] * scale) % batch_shards(mesh):
        raise ValueError(f"the batch's {groups} tile groups do not split over the {batch_shards(mesh)} batch shards "
                         f"of the mesh; set the data's num_devices to the batch shards (x micro-batches) each "
                         f"process feeds")
    out = {}
    for k in keys:
        x = np.asarray(batch[k], ALL_DTYPES[k])
        global_shape = (x.shape[0] * scale, *x.shape[1:])
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, global_shape), x, global_shape)
    return out


def abstract_batch(cfg: ModelConfig, global_rows: int, seq_len: int, max_tiles: int, mesh: Mesh,
                   tile_budget: int | None = None, groups: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch `to_global` builds, as sharded shapes (nothing allocated); with `tile_budget`, `groups`
    (default: the mesh's batch shards) groups of rows with that many tiles each; AnyRes: `max_tiles` patch slots."""
    groups = batch_shards(mesh) if groups is None else groups
    return {k: jax.ShapeDtypeStruct(s, ALL_DTYPES[k], sharding=batch_sharding(mesh, s))
            for k, s in batch_shapes(cfg, global_rows, seq_len, max_tiles, tile_budget, groups).items()}


def anyres_row(patches: np.ndarray, grids: np.ndarray, cfg: VisionConfig, max_patches: int) -> dict[str, np.ndarray]:
    """One row's AnyRes batch arrays (no row axis) from its samples' patches [P, p*p*C] and patch grids [n, 2], in
    row order (the k-th `<IMG_CONTEXT>` run of the row is the k-th image)."""
    packed = pack_patches(patches, grids, cfg, max_patches)
    return {ANYRES_PREFIX + f: np.asarray(getattr(packed, f))[0] for f in PackedImages.__dataclass_fields__}


def packed_images(batch: Mapping[str, jax.Array]) -> PackedImages | None:
    """The model's AnyRes input (`SailVL(..., images=)`) from a batch's AnyRes keys; None for a tile batch."""
    if "anyres_patches" not in batch:
        return None
    return PackedImages(**{f: batch[ANYRES_PREFIX + f] for f in PackedImages.__dataclass_fields__})
