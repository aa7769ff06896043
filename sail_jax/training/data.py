"""The trainer's data interface: a factory making a checkpointable iterator of process-local batches.

A batch is a dict of numpy arrays (this process's rows of the global batch):
`input_ids`, `segment_ids` (0 = padding), `positions`, `loss_mask` [B, T] int32;
`pixel_values` [B, max_tiles, C, H, W] float32 and `tile_mask` [B, max_tiles] bool.
The iterator has `get_state()` / `set_state(state)` (Grain `DatasetIterator` semantics) so checkpoints can
store where it is. `synthetic.synthetic_data` is one factory; the Grain pipeline is another.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from sail_jax.config import ModelConfig
from sail_jax.sharding import batch_sharding

INT_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")
KEYS = (*INT_KEYS, "pixel_values", "tile_mask")


class DataIterator(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class DataFactory(Protocol):
    """`data(cfg=..., global_batch_size=..., seq_len=..., process_index=..., process_count=..., seed=...)`."""

    def __call__(
        self,
        *,
        cfg: ModelConfig,
        global_batch_size: int,
        seq_len: int,
        process_index: int,
        process_count: int,
        seed: int,
    ) -> Iterator[dict[str, np.ndarray]]: ...


def check_batch(batch: dict[str, np.ndarray], local_rows: int, seq_len: int, cfg: ModelConfig) -> None:
    """Fail with the offending key and shape when a batch does not match the interface."""
    missing = [k for k in KEYS if k not in batch]
    if missing:
        raise ValueError(f"data batch lacks {missing}; got keys {sorted(batch)}")
    for k in INT_KEYS:
        if batch[k].shape != (local_rows, seq_len):
            raise ValueError(f"data batch[{k!r}] has shape {batch[k].shape}; expected {(local_rows, seq_len)}")
    v = cfg.vision
    pix, tiles = batch["pixel_values"], batch["tile_mask"]
    if pix.ndim != 5 or pix.shape[0] != local_rows or pix.shape[2:] != (v.num_channels, v.image_size, v.image_size):
        raise ValueError(
            f"data batch['pixel_values'] has shape {pix.shape}; expected "
            f"({local_rows}, max_tiles, {v.num_channels}, {v.image_size}, {v.image_size})"
        )
    if tiles.shape != pix.shape[:2]:
        raise ValueError(f"data batch['tile_mask'] has shape {tiles.shape}; expected {pix.shape[:2]}")


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, global_rows: int) -> dict[str, jax.Array]:
    """Assemble the global batch from every process's rows, sharded over the batch axes of the mesh (only the
    interface's keys; anything else a pipeline adds stays on the host)."""
    out = {}
    for k in KEYS:
        x = np.asarray(batch[k], np.int32 if k in INT_KEYS else None)
        global_shape = (global_rows, *x.shape[1:])
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, global_shape), x, global_shape)
    return out
