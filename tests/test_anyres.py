"""SAIL-ViT-AnyRes: bicubic positions vs torch, packing invariance, 2D RoPE, size checks, a 1792x1792 image."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.load import load_sailvl_checkpoint
from sail_jax.config import RuntimeConfig, VisionConfig
from sail_jax.layers.rope import apply_rope
from sail_jax.models.adapter import pixel_shuffle
from sail_jax.models.anyres import (
    anyres_size,
    axial_rope,
    bicubic_taps,
    check_image_size,
    gather_pixel_shuffle,
    interpolate_positions,
    pack_images,
    stack_packed,
)
from sail_jax.models.sail_vit import SailViT
from tests.conftest import DATA
from tests.random_params import random_params

VIT = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
SIZES = [(28, 56), (224, 336), (448, 448)]  # (H, W): grids 2x4, 16x24, 32x32
LENGTH = 1536  # static packed row length shared by the tests (one compilation per RoPE setting)


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, h, w)).astype(np.float32) for h, w in sizes]


@pytest.fixture(scope="module")
def vit_params():
    """Random tiny ViT params (shared by the RoPE and no-RoPE variants): norms perturbed, qkv scaled up so
    attention is far from uniform and RoPE / cross-image leaks show."""
    params = random_params(SailViT(VIT), jnp.zeros((1, 3, 448, 448)))
    return jax.tree_util.tree_map_with_path(lambda path, x: x * 10 if "qkv" in jax.tree_util.keystr(path) else x,
                                            params)


def _vit(rope: bool) -> SailViT:
    return SailViT(dataclasses.replace(VIT, use_2d_rope=rope))


@functools.cache
def _anyres(rope: bool):
    """Jitted AnyRes last_hidden_state [L, C] of one packed row; the tests share LENGTH so it compiles once."""
    return jax.jit(lambda p, b: _vit(rope).apply(p, b, method=SailViT.anyres).last_hidden_state[0])


@pytest.mark.parametrize("h, w", [(2, 4), (16, 24), (20, 44), (64, 40), (128, 128), (126, 2)])
def test_bicubic_positions_match_torch(h, w):
    table = np.random.default_rng(0).standard_normal((32 * 32, 8)).astype(np.float32)
    index, weight = bicubic_taps(h, w, 32)
    ours = np.asarray(interpolate_positions(jnp.asarray(table), jnp.asarray(index), jnp.asarray(weight)))
    grid = torch.from_numpy(table.reshape(32, 32, 8)).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    assert np.abs(ours - ref[0].permute(1, 2, 0).reshape(h * w, 8).numpy()).max() <= 1e-5


def test_bicubic_identity_on_table_grid():
    table = np.random.default_rng(1).standard_normal((32 * 32, 8)).astype(np.float32)
    index, weight = bicubic_taps(32, 32, 32)
    np.testing.assert_array_equal(np.sort(weight, axis=1)[:, -1], 1.0)
    ours = np.asarray(interpolate_positions(jnp.asarray(table), jnp.asarray(index), jnp.asarray(weight)))
    np.testing.assert_array_equal(ours, table)


@pytest.mark.parametrize("rope", [False, True])
def test_448_anyres_equals_fixed_resolution(vit_params, rope):
    (image,) = _images([(448, 448)])
    vit = _vit(rope)
    fixed = jax.jit(vit.apply)(vit_params, jnp.asarray(image[None])).last_hidden_state[0]
    any_out = _anyres(rope)(vit_params, pack_images([image], vit.cfg, length=LENGTH))  # with padding
    assert np.abs(np.asarray(any_out[:1024]) - np.asarray(fixed)).max() <= 1e-5


def test_448_anyres_matches_original_implementation():
    """AnyRes on a 448x448 tile reproduces the original code's fixed-resolution ViT output (fixture)."""
    cfg, params = load_sailvl_checkpoint(DATA / "sailvl2-tiny" / "checkpoint")
    tile = np.load(DATA / "sailvl2-tiny" / "inputs.npz")["pixel_values"][0]
    want = np.load(DATA / "sailvl2-tiny" / "outputs.npz")["vit_last_hidden_state"][0]
    vit = SailViT(cfg.vision, cfg.runtime)
    run = jax.jit(lambda p, b: vit.apply(p, b, method=SailViT.anyres))
    out = run({"params": params["params"]["vision_model"]}, pack_images([tile], cfg.vision))
    assert np.abs(np.asarray(out.last_hidden_state[0]) - want).max() <= 1e-5


@pytest.mark.parametrize("rope", [False, True])
def test_packed_images_equal_each_alone(vit_params, rope):
    images = _images(SIZES)
    packed = np.asarray(_anyres(rope)(vit_params, pack_images(images, VIT, length=LENGTH)))
    start = 0
    for im in images:
        n = (im.shape[1] // 14) * (im.shape[2] // 14)
        alone = np.asarray(_anyres(rope)(vit_params, pack_images([im], VIT, length=LENGTH)))[:n]
        assert np.abs(packed[start: start + n] - alone).max() <= 1e-5, im.shape
        start += n


def test_rows_stack_into_a_batch(vit_params):
    images = _images(SIZES[:2])
    row = np.asarray(_anyres(False)(vit_params, pack_images(images, VIT, length=LENGTH)))
    batch = stack_packed([pack_images([im], VIT, length=LENGTH) for im in images])
    out = jax.jit(lambda p, b: _vit(False).apply(p, b, method=SailViT.anyres).last_hidden_state)(vit_params, batch)
    assert np.abs(np.asarray(out[0, :8]) - row[:8]).max() <= 1e-5
    assert np.abs(np.asarray(out[1, :384]) - row[8:392]).max() <= 1e-5
    with pytest.raises(ValueError, match="different lengths"):
        stack_packed([pack_images(images[:1], VIT), pack_images(images[1:], VIT)])


def test_2d_rope_changes_output(vit_params):
    batch = pack_images(_images([(224, 336)]), VIT, length=LENGTH)
    off, on = (np.asarray(_anyres(rope)(vit_params, batch))[:384] for rope in (False, True))
    assert np.abs(off - on).max() > 1e-2


def test_axial_rope_is_relative_per_axis():
    """q.k after rotation depends only on the (row, col) offset, on both axes independently."""
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))

    @jax.jit
    def rotated_dot(pq, pk):
        cq, sq = axial_rope(pq[None, None], 16, 100.0)
        ck, sk = axial_rope(pk[None, None], 16, 100.0)
        return jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk))

    def score(pq, pk):
        return float(rotated_dot(jnp.asarray(pq, jnp.float32), jnp.asarray(pk, jnp.float32)))

    base = score((3.0, 5.0), (1.0, 2.0))
    assert abs(base - score((13.0, 25.0), (11.0, 22.0))) < 1e-4
    assert abs(base - score((3.0, 6.0), (1.0, 2.0))) > 1e-3  # column offset matters
    assert abs(base - score((4.0, 5.0), (1.0, 2.0))) > 1e-3  # row offset matters


def test_rope_positions_rescaled_to_table_grid():
    batch = pack_images(_images([(28, 56), (896, 448)]), VIT)
    pos = np.asarray(batch.rope_pos[0])
    np.testing.assert_array_equal(pos[:8], [[r * 16, c * 8] for r in range(2) for c in range(4)])
    second = pos[8: 8 + 64 * 32].reshape(64, 32, 2)
    np.testing.assert_array_equal(second[:, 0, 0], np.arange(64) * 0.5)
    np.testing.assert_array_equal(second[0, :, 1], np.arange(32))


def test_gather_shuffle_equals_per_image_pixel_shuffle():
    images = _images(SIZES)
    batch = pack_images(images, VIT, length=1600)
    feats = jnp.asarray(np.random.default_rng(2).standard_normal((1, 1600, 5)), jnp.float32)
    got = np.asarray(gather_pixel_shuffle(feats, jnp.asarray(batch.shuffle_index)))[0]
    mask = np.asarray(batch.token_mask[0])
    start, want = 0, []
    for im in images:
        h, w = im.shape[1] // 14, im.shape[2] // 14
        want.append(np.asarray(pixel_shuffle(feats[:, start: start + h * w], h, w))[0])
        start += h * w
    want = np.concatenate(want)
    assert mask.sum() == len(want) and mask[: len(want)].all()
    np.testing.assert_array_equal(got[: len(want)], want)


def test_size_errors():
    with pytest.raises(ValueError, match="multiples of 28"):
        pack_images(_images([(42, 56)]), VIT)
    with pytest.raises(ValueError, match="max_anyres_patches=64"):
        pack_images(_images([(224, 224)]), dataclasses.replace(VIT, max_anyres_patches=64))
    with pytest.raises(ValueError, match="packed length 100"):
        pack_images(_images([(112, 112)] * 2), VIT, length=100)
    with pytest.raises(ValueError, match=r"expected \[C=3"):
        pack_images([np.zeros((1, 28, 28), np.float32)], VIT)
    with pytest.raises(ValueError, match="max_anyres_patches=16384"):
        check_image_size(1792 + 28, 1792, VIT)


@pytest.mark.parametrize(
    "w,h", [(640, 480), (10, 10), (4000, 3000), (1792, 1792), (20, 100000), (100000, 20), (3000, 50)]
)
def test_anyres_size_at_the_default_budget(w, h):
    ah, aw = anyres_size(h, w, VisionConfig())
    assert aw % 28 == 0 and ah % 28 == 0 and aw >= 28 and ah >= 28
    assert (aw // 14) * (ah // 14) <= 16384
    if w * h <= 1792 * 1792 and min(w, h) >= 28 and max(w, h) <= 1792:
        assert (aw, ah) == (round(w / 28) * 28, round(h / 28) * 28)  # no rescaling below the budget
    elif min(w, h) >= 28 and w * h > 1792 * 1792:
        assert abs(aw / ah - w / h) / (w / h) < 0.15 and aw * ah > 0.8 * 1792 * 1792


@pytest.mark.parametrize("h, w", [(480, 640), (4000, 3000), (30, 100_000), (1792, 1792), (10, 10)])
def test_anyres_size_is_valid(h, w):
    th, tw = anyres_size(h, w, VIT)
    gh, gw = check_image_size(th, tw, VIT)  # raises if invalid
    assert gh * gw <= VIT.max_anyres_patches
    if max(h, w) / min(h, w) < 10:
        assert abs(th / tw - h / w) / (h / w) < 0.1


def test_1792_image_runs():
    """16,384 patches in one row (the AnyRes maximum) through a very small ViT with 2D RoPE. The XLA attention
    chunks the queries, so the compiled temporaries stay far below one whole [N, N] float32 score matrix."""
    cfg = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=1, use_2d_rope=True)
    vit = SailViT(cfg, RuntimeConfig(attention_q_chunk=1024))
    params = random_params(vit, jnp.zeros((1, 3, 448, 448)))
    image = np.random.default_rng(0).standard_normal((3, 1792, 1792)).astype(np.float32)
    batch = pack_images([image], cfg, length=cfg.max_anyres_patches)
    fwd = jax.jit(lambda p, b: vit.apply(p, b, method=SailViT.anyres).last_hidden_state).lower(params, batch).compile()
    scores_bytes = 16384**2 * 4
    assert fwd.memory_analysis().temp_size_in_bytes < scores_bytes / 4
    out = fwd(params, batch)
    assert out.shape == (1, 16384, 16) and bool(jnp.isfinite(out).all())
