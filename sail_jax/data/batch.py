"""The batch contract between data sources and the train step: keys, dtypes, shapes, checks and the global batch.

A data factory (`DataFactory`: the Grain pipeline's `grain_data`, `training.synthetic.synthetic_data`) yields
this process's rows of each global batch as a dict of numpy arrays:

    input_ids, segment_ids (0 = padding), positions, loss_mask   [B, T]                      int32
    pixel_values                                                 [B, max_tiles, C, S, S]     float32
    tile_mask                                                    [B, max_tiles]              bool

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

from sail_jax.config import ModelConfig
from sail_jax.sharding import batch_sharding

DTYPES: dict[str, type] = {
    "input_ids": np.int32, "segment_ids": np.int32, "positions": np.int32, "loss_mask": np.int32,
    "pixel_values": np.float32, "tile_mask": np.bool_,
}
KEYS = tuple(DTYPES)
TOKEN_KEYS = KEYS[:4]  # the [B, T] arrays
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


def batch_shapes(cfg: ModelConfig, rows: int, seq_len: int, max_tiles: int) -> dict[str, tuple[int, ...]]:
    """The shape of each key for `rows` rows."""
    v = cfg.vision
    shapes = {k: (rows, seq_len) for k in TOKEN_KEYS}
    shapes["pixel_values"] = (rows, max_tiles, v.num_channels, v.image_size, v.image_size)
    shapes["tile_mask"] = (rows, max_tiles)
    return shapes


def check_batch(batch: Mapping[str, np.ndarray], rows: int, seq_len: int, cfg: ModelConfig) -> None:
    """Fail with the offending key, shape or dtype when a process-local batch does not follow the contract (any
    number of tile slots)."""
    missing = [k for k in KEYS if k not in batch]
    if missing:
        raise ValueError(f"data batch lacks {missing}; got keys {sorted(batch)}")
    pix, v = batch["pixel_values"], cfg.vision
    if pix.ndim != 5:
        raise ValueError(f"data batch['pixel_values'] has shape {pix.shape}; expected "
                         f"({rows}, max_tiles, {v.num_channels}, {v.image_size}, {v.image_size})")
    for k, shape in batch_shapes(cfg, rows, seq_len, pix.shape[1]).items():
        if batch[k].shape != shape:
            raise ValueError(f"data batch[{k!r}] has shape {batch[k].shape}; expected {shape}")
    for k, dtype in DTYPES.items():
        kind = np.dtype(dtype).kind
        if np.dtype(batch[k].dtype).kind not in ("f" if kind == "f" else "biu"):
            raise ValueError(f"data batch[{k!r}] has dtype {batch[k].dtype}; expected {np.dtype(dtype).name}")


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, global_rows: int) -> dict[str, jax.Array]:
    """Assemble the global batch from every process's rows (cast to the contract's dtypes), its rows sharded over
    the data-parallel axes of the mesh."""
    out = {}
    for k, dtype in DTYPES.items():
        x = np.asarray(batch[k], dtype)
        global_shape = (global_rows, *x.shape[1:])
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, global_shape), x, global_shape)
    return out


def abstract_batch(cfg: ModelConfig, global_rows: int, seq_len: int, max_tiles: int, mesh: Mesh
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch `to_global` builds, as sharded shapes (nothing allocated)."""
    return {k: jax.ShapeDtypeStruct(s, DTYPES[k], sharding=batch_sharding(mesh, s))
            for k, s in batch_shapes(cfg, global_rows, seq_len, max_tiles).items()}
