"""A deterministic synthetic data source following the batch contract (`data.batch`), for tests and development.

Each global batch is a pure function of (seed, step, row), so any process can build exactly its own rows, a
restored iterator continues with the same batches, and a 1-process run sees the same global batch as an
N-process run. Rows are packed with several samples; a sample is an optional image (a run of
`<IMG_CONTEXT>` tokens taking the next tile slots), a short prompt and an answer that continues an
arithmetic progression mod `pattern_mod` (learnable from the two preceding tokens). Only answer tokens are
targets, as assistant tokens are in real data. For a SAIL-ViT-AnyRes model (`anyres`) each tile is one
image_size x image_size AnyRes image, and the rows carry the contract's packed `anyres_*` keys (max_tiles images
of patch slots).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sail_jax.config import ModelConfig, VisionConfig
from sail_jax.data.batch import DTYPES, KEYS, TOKEN_KEYS, anyres_row, local_rows
from sail_jax.data.elastic import GLOBAL
from sail_jax.models.anyres import patchify


class SyntheticSource:
    """Iterator of process-local batches; `get_state`/`set_state` follow Grain's `DatasetIterator`."""

    def __init__(
        self,
        *,
        global_batch_size: int,
        seq_len: int,
        vocab_size: int,
        img_context_id: int,
        tokens_per_tile: int,
        image_size: int,
        num_channels: int = 3,
        max_tiles: int = 2,
        image_prob: float = 0.5,
        pattern_mod: int = 64,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        nan_at_steps: Sequence[int] = (),
        anyres: VisionConfig | None = None,
    ):
        self.local_rows = local_rows(global_batch_size, process_count)
        if pattern_mod + 2 > vocab_size:
            raise ValueError(f"pattern_mod={pattern_mod} needs a vocabulary of at least {pattern_mod + 2} tokens")
        if 1 <= img_context_id <= pattern_mod:
            raise ValueError(f"img_context_id={img_context_id} collides with the pattern tokens 1..{pattern_mod}")
        if nan_at_steps and max_tiles == 0:
            raise ValueError("nan_at_steps needs image tiles to poison (max_tiles > 0)")
        self.global_batch_size = global_batch_size
        self.row_offset = process_index * self.local_rows
        self.seq_len = seq_len
        self.img_context_id = img_context_id
        self.tokens_per_tile = tokens_per_tile
        self.image_shape = (num_channels, image_size, image_size)
        self.max_tiles = max_tiles
        self.image_prob = image_prob
        self.pattern_mod = pattern_mod
        self.seed = seed
        self.nan_at_steps = frozenset(int(s) for s in nan_at_steps)
        self.anyres = anyres
        self.step = 0

    def __iter__(self) -> SyntheticSource:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """The global step: the same on every process, valid for any process count (`data.elastic`)."""
        return {"elastic": GLOBAL, "step": self.step, "seed": self.seed}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"iterator state was saved with seed {state.get('seed')}, this source has {self.seed}")
        self.step = int(state["step"])

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """The process-local rows of global batch `step`."""
        rows = [self._row(step, self.row_offset + r) for r in range(self.local_rows)]
        batch = {k: np.stack([row[k] for row in rows]).astype(DTYPES[k], copy=False) for k in KEYS}
        if step in self.nan_at_steps:
            batch["pixel_values"][:] = np.nan
        return batch if self.anyres is None else self._as_anyres(batch)

    def _as_anyres(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each real tile as one AnyRes image of its size, packed per row (`batch.anyres_row`)."""
        v = self.anyres
        g = self.image_shape[-1] // v.patch_size
        rows = []
        for pixels, real in zip(batch["pixel_values"], batch["tile_mask"]):
            patches = patchify(pixels[real], v.patch_size).reshape(-1, v.patch_size**2 * v.num_channels)
            rows.append(anyres_row(patches, np.full((int(real.sum()), 2), g), v, self.max_tiles * g * g))
        return {**{k: batch[k] for k in TOKEN_KEYS}, **{k: np.stack([r[k] for r in rows]) for k in rows[0]}}

    def _row(self, step: int, row: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step, row])
        t = self.seq_len
        ids = np.zeros(t, np.int32)
        seg = np.zeros(t, np.int32)
        pos = np.zeros(t, np.int32)
        mask = np.zeros(t, np.int32)
        pixels = np.zeros((self.max_tiles, *self.image_shape), np.float32)
        tiles = np.zeros(self.max_tiles, bool)
        cursor, used_tiles, sample = 0, 0, 0
        while True:
            n_tiles = 0
            # The first sample of a row carries an image whenever one fits, so rows normally have one.
            if used_tiles < self.max_tiles and (sample == 0 or rng.random() < self.image_prob):
                n_tiles = int(rng.integers(1, self.max_tiles - used_tiles + 1))
            n_prompt, n_answer = int(rng.integers(2, 6)), int(rng.integers(3, 10))
            n_img = n_tiles * self.tokens_per_tile
            if cursor + n_img + n_prompt + n_answer > t:
                if sample > 0:
                    break
                if n_prompt + n_answer > t:
                    raise ValueError(f"seq_len={t} is too short for one synthetic sample")
                n_tiles = n_img = 0  # the first sample's image does not fit: keep its text
            sample += 1
            start, stride = int(rng.integers(0, self.pattern_mod)), int(rng.integers(1, 4))
            pattern = (start + stride * np.arange(n_prompt + n_answer)) % self.pattern_mod + 1
            tokens = np.concatenate([np.full(n_img, self.img_context_id, np.int32), pattern.astype(np.int32)])
            span = slice(cursor, cursor + len(tokens))
            ids[span], seg[span], pos[span] = tokens, sample, np.arange(len(tokens))
            mask[cursor + n_img + n_prompt : cursor + len(tokens)] = 1
            if n_img:
                pixels[used_tiles : used_tiles + n_tiles] = rng.standard_normal(
                    (n_tiles, *self.image_shape), dtype=np.float32
                )
                tiles[used_tiles : used_tiles + n_tiles] = True
                used_tiles += n_tiles
            cursor += len(tokens)
        return {"input_ids": ids, "segment_ids": seg, "positions": pos, "loss_mask": mask,
                "pixel_values": pixels, "tile_mask": tiles}


def synthetic_data(
    *,
    cfg: ModelConfig,
    global_batch_size: int,
    seq_len: int,
    process_index: int,
    process_count: int,
    seed: int,
    max_tiles: int = 2,
    image_prob: float = 0.5,
    pattern_mod: int = 64,
    nan_at_steps: Sequence[int] = (),
) -> SyntheticSource:
    """Data factory (the trainer's `data` argument) for `SyntheticSource`, sized from the model config."""
    if cfg.img_context_token_id >= cfg.llm.vocab_size:
        raise ValueError(
            f"img_context_token_id={cfg.img_context_token_id} is outside the vocabulary "
            f"({cfg.llm.vocab_size}); set ModelConfig.img_context_token_id for small-vocabulary models"
        )
    return SyntheticSource(
        global_batch_size=global_batch_size, seq_len=seq_len, vocab_size=cfg.llm.vocab_size,
        img_context_id=cfg.img_context_token_id, tokens_per_tile=cfg.tokens_per_tile,
        image_size=cfg.vision.image_size, num_channels=cfg.vision.num_channels, max_tiles=max_tiles,
        image_prob=image_prob, pattern_mod=min(pattern_mod, cfg.llm.vocab_size - 2), seed=seed,
        process_index=process_index, process_count=process_count, nan_at_steps=nan_at_steps,
        anyres=cfg.vision if cfg.vision.anyres else None,
    )
