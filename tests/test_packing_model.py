"""Packing is invisible to the loss: through a tiny random SailVL, every sample's summed NLL in a packed, tile-
balanced batch equals its NLL alone (positions reset, segment-id attention, tiles matched to `<IMG_CONTEXT>`)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from sail_jax.config import get_preset
from sail_jax.data.packing import VisualBatchIterDataset, pack_rows
from sail_jax.models.sail_vl import SailVL
from sail_jax.training.loss import next_token_targets

VOCAB, CTX, IMG_START, IMG_END = 512, 500, 501, 502


def tiny_config():
    cfg = get_preset("tiny")
    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, image_size=56),  # 16 patches -> 4 tokens per tile
        llm=dataclasses.replace(cfg.llm, vocab_size=VOCAB),
        img_context_token_id=CTX,
    )


def make_sample(rng: np.random.Generator, i: int, tiles_per_image: list[int], tokens_per_tile: int) -> dict:
    ids, mask, pixels = [], [], []
    for n in tiles_per_image:
        ids += rng.integers(0, 400, int(rng.integers(2, 6))).tolist() + [IMG_START] + [CTX] * (n * tokens_per_tile)
        ids += [IMG_END]
        pixels.append(rng.normal(size=(n, 3, 56, 56)).astype(np.float32))
    head = len(ids)
    ids += rng.integers(0, 400, int(rng.integers(6, 14))).tolist()
    mask = [0] * head + [0, 0] + [1] * (len(ids) - head - 2)
    return {"input_ids": np.array(ids, np.int32), "loss_mask": np.array(mask, np.int32),
            "pixel_values": np.concatenate(pixels) if pixels else np.zeros((0, 3, 56, 56), np.float32),
            "info": {"where": f"s:{i}"}}


def per_position_nll(model: SailVL, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """NLL of every position's next-token target and its loss weight, as the trainer computes them."""
    out = model.apply(params, batch["input_ids"], batch["pixel_values"], batch["tile_mask"],
                      positions=batch["positions"], segment_ids=batch["segment_ids"])
    targets, weights = next_token_targets(batch["input_ids"], batch["loss_mask"], batch["segment_ids"])
    logits = out.logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0], weights


def random_params(model: SailVL, batch: dict):
    """Random weights of O(1) effect (flax init on CPU is slow here; shapes come from eval_shape): norm scales near 1,
    kernels ~ N(0, 1/fan_in), so the loss depends strongly on attention and positions."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *(batch[k][:1] for k in
                                                                         ("input_ids", "pixel_values", "tile_mask"))))
    rng = np.random.default_rng(1)

    def init(path, s):
        name = jax.tree_util.keystr(path)
        if "norm" in name and "scale" in name:
            return (1 + 0.1 * rng.normal(size=s.shape)).astype(s.dtype)
        fan_in = np.prod(s.shape[:-1]) if len(s.shape) > 1 else 1
        return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(init, shapes)


def test_packed_loss_equals_unpacked_loss_per_sample():
    cfg = tiny_config()
    model = SailVL(cfg)
    tpt = cfg.tokens_per_tile
    rng = np.random.default_rng(0)
    layouts = [[2], [], [1, 1], [3], [], [1], [2, 1]]
    samples = [make_sample(rng, i, layout, tpt) for i, layout in enumerate(layouts)]
    seq_len, max_tiles = 48, 4
    ds = grain.MapDataset.source(samples).to_iter_dataset(grain.ReadOptions(num_threads=0))
    batches = list(VisualBatchIterDataset(pack_rows(ds, seq_len, max_tiles, num_bins=4, seed=0), 4, n_devices=2))
    assert len(batches) == 1
    batch = batches[0]
    assert batch["segment_ids"].max(axis=1).sum() == len(samples)
    assert (batch["segment_ids"].max(axis=1) >= 2).any()  # rows really hold several samples

    params = random_params(model, batch)
    nll_fn = jax.jit(lambda p, b: per_position_nll(model, p, b))
    nll, w = map(np.asarray, nll_fn(params, batch))
    packed = {}
    for r in range(batch["input_ids"].shape[0]):
        for s in range(1, batch["segment_ids"][r].max() + 1):
            at = batch["segment_ids"][r] == s
            key = tuple(batch["input_ids"][r][at])
            packed[key] = float(np.sum(nll[r][at].astype(np.float64) * w[r][at]))

    for smp in samples:  # alone: one sample in a row of its own (padded to one shape: a single compilation)
        n, t = len(smp["input_ids"]), len(smp["pixel_values"])
        pad = lambda x, size, value=0: np.concatenate([x, np.full((size - len(x), *x.shape[1:]), value, x.dtype)])
        alone = {"input_ids": pad(smp["input_ids"], seq_len)[None], "loss_mask": pad(smp["loss_mask"], seq_len)[None],
                 "positions": pad(np.arange(n, dtype=np.int32), seq_len)[None],
                 "segment_ids": pad(np.ones(n, np.int32), seq_len)[None],
                 "pixel_values": pad(smp["pixel_values"], max_tiles)[None],
                 "tile_mask": (np.arange(max_tiles) < t)[None]}
        nll1, w1 = map(np.asarray, nll_fn(params, alone))
        ref = float(np.sum(nll1[0, :n].astype(np.float64) * w1[0, :n]))
        assert ref > 0
        np.testing.assert_allclose(packed[tuple(smp["input_ids"])], ref, rtol=1e-5)

    # The comparison is sensitive: letting packed samples see each other changes their losses. (Positions that
    # fail to restart would not: RoPE is relative and attention stays within a segment.)
    wrong = dict(batch, segment_ids=(batch["segment_ids"] > 0).astype(np.int32))
    nll2, _ = map(np.asarray, nll_fn(params, wrong))
    assert np.abs((nll2 - nll) * w).max() > 1e-2
