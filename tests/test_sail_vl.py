"""SailVL model-side behaviour: text-only, tile slots with tile_mask, packed samples, AnyRes feature scatter."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sail_jax.config import AdapterConfig, get_preset
from sail_jax.models.adapter import PixelShuffleAdapter
from sail_jax.models.anyres import pack_images
from sail_jax.models.qwen3 import Qwen3ForCausalLM
from sail_jax.models.sail_vit import SailViT
from sail_jax.models.sail_vl import SailVL, dummy_inputs
from tests.random_params import random_params

CTX = 500  # <IMG_CONTEXT> id of the test model (a small vocabulary keeps full logits cheap)
_TINY = get_preset("tiny")
CFG = _TINY.replace(llm=dataclasses.replace(_TINY.llm, vocab_size=512), img_context_token_id=CTX)
MODEL = SailVL(CFG)
TOK = CFG.tokens_per_tile  # 256


@pytest.fixture(scope="module")
def params():
    return random_params(MODEL, *dummy_inputs(CFG), seed=0)


@jax.jit
def _logits(params, ids, pixel_values=None, tile_mask=None, segment_ids=None, positions=None, images=None):
    return MODEL.apply(params, ids, pixel_values, tile_mask, segment_ids=segment_ids, positions=positions,
                       images=images).logits


def _text(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CTX, n)


def _sample(parts) -> np.ndarray:
    """parts: ints = that many <IMG_CONTEXT> slots, arrays = text ids."""
    return np.concatenate([np.full(p, CTX) if isinstance(p, int) else p for p in parts]).astype(np.int32)


def _tiles(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 448, 448)).astype(np.float32)


def test_text_only_equals_language_model(params):
    ids = jnp.asarray(np.stack([_text(24, 1), _text(24, 2)]), jnp.int32)
    lm = Qwen3ForCausalLM(CFG.llm, CFG.runtime)
    want = jax.jit(lm.apply)({"params": params["params"]["language_model"]}, ids).logits
    np.testing.assert_allclose(np.asarray(_logits(params, ids)), np.asarray(want), rtol=0, atol=1e-6)


def test_tile_mask_padding_slots(params):
    ids = jnp.asarray(_sample([_text(5, 3), 2 * TOK, _text(7, 4)])[None])
    real, junk = _tiles(2, 5), _tiles(2, 6)
    slots = np.stack([real[0], junk[0], real[1], junk[1]])[None]  # [B=1, 4 slots, 3, H, W]
    padded = _logits(params, ids, jnp.asarray(slots), jnp.asarray([[True, False, True, False]]))
    plain = _logits(params, ids, jnp.asarray(real))
    assert np.abs(np.asarray(padded) - np.asarray(plain)).max() <= 1e-5
    unmasked = _logits(params, ids, jnp.asarray(slots), jnp.ones((1, 4), bool))  # junk tile 0 fills slot 2
    assert np.abs(np.asarray(unmasked) - np.asarray(plain)).max() > 1e-3


def test_rows_of_tile_slots_scatter_within_each_row(params):
    """[B, slots, ...] pixel values: each row's context slots take that row's tiles. Equal to the batch-global
    order when the counts match; when a row has fewer slots than its tiles give, the next row still gets its own."""
    t0, t1, junk = _tiles(2, 20), _tiles(1, 21), _tiles(1, 22)
    rows = np.stack([_sample([_text(3, 23), 2 * TOK, _text(6, 24)]), _sample([_text(6, 25), TOK, _text(3, 26), TOK])])
    slots = jnp.asarray(np.stack([t0, np.concatenate([t1, junk])]))  # [2 rows, 2 slots, 3, H, W]
    mask = jnp.asarray([[True, True], [True, False]])
    per_row = np.asarray(_logits(params, jnp.asarray(rows), slots, mask))
    flat = np.asarray(_logits(params, jnp.asarray(rows), jnp.asarray(np.concatenate([t0, t1]))))
    assert np.abs(per_row - flat).max() <= 1e-5  # 3 tiles' features fill 3 x TOK slots either way

    short = rows.copy()
    short[0, 3 + TOK: 3 + 2 * TOK] = _text(TOK, 27)  # row 0 keeps one tile's slots, its 2nd tile is left over
    got = np.asarray(_logits(params, jnp.asarray(short), slots, mask))[1]
    alone = np.asarray(_logits(params, jnp.asarray(short[1:]), slots[1:], mask[1:]))[0]
    assert np.abs(got - alone).max() <= 1e-5  # row 1 sees tile t1, not row 0's left-over tile
    with pytest.raises(ValueError, match="pixel_values has 1 rows of tile slots; input_ids has 2"):
        _logits(params, jnp.asarray(rows), slots[:1], mask[:1])


def _row(samples, length):
    """Pack token samples into one row of `length`: ids, segment ids (1, 2, ...; 0 = padding), positions."""
    ids, seg, pos = (np.zeros((1, length), np.int32) for _ in range(3))
    start = 0
    for k, smp in enumerate(samples):
        ids[0, start: start + len(smp)] = smp
        seg[0, start: start + len(smp)] = k + 1
        pos[0, start: start + len(smp)] = np.arange(len(smp))
        start += len(smp)
    return jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos)


def test_packed_samples_equal_separate(params):
    """Two samples (1 and 2 tiles) in one row equal each sample alone in its own row (same static shapes,
    so one compilation: the alone rows are padded and their unused tile slots masked)."""
    a = _sample([_text(4, 7), TOK, _text(6, 8)])
    b = _sample([_text(3, 9), 2 * TOK, _text(5, 10)])
    ta, tb, junk = _tiles(1, 11), _tiles(2, 12), _tiles(2, 13)
    n = len(a) + len(b) + 3

    def run(samples, tiles, mask):
        ids, seg, pos = _row(samples, n)
        return np.asarray(_logits(params, ids, jnp.asarray(tiles), jnp.asarray(mask), seg, pos))[0]

    packed = run([a, b], np.concatenate([ta, tb]), [True, True, True])
    alone_a = run([a], np.concatenate([ta, junk]), [True, False, False])
    alone_b = run([b], np.concatenate([tb, junk[:1]]), [True, True, False])
    assert np.abs(packed[: len(a)] - alone_a[: len(a)]).max() <= 1e-5
    assert np.abs(packed[len(a): len(a) + len(b)] - alone_b[: len(b)]).max() <= 1e-5


SIZES = [(28, 56), (224, 336), (448, 448)]  # (H, W) -> 2, 96, 256 LLM tokens
LENGTH = 1536  # static packed ViT row


def _images(sizes, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, h, w)).astype(np.float32) for h, w in sizes]


def test_anyres_features_fill_context_slots_in_order(params):
    images = _images(SIZES, 13)
    grids = [(h // 14, w // 14) for h, w in SIZES]
    counts = [h * w // 4 for h, w in grids]
    ids = _sample([_text(3, 14), counts[0], _text(2, 15), counts[1], _text(2, 16), counts[2], _text(3, 17)])
    packed = pack_images(images, CFG.vision, length=LENGTH)
    alone = [pack_images([im], CFG.vision, length=LENGTH) for im in images]

    @jax.jit  # one compilation; every array is an argument (closed-over arrays would be constant-folded)
    def compute(p, ids, packed, alone, tile):
        m = MODEL.bind(p)
        embeds, text = m.embed(ids, images=packed)[0], m.embed(ids)[0]
        # each image alone: ViT on its own row, then the reshape pixel shuffle on its grid and mlp1
        per_image = [m.mlp1(m.vision_model.anyres(b).selected[:, : g[0] * g[1]], g)[0] for b, g in zip(alone, grids)]
        return embeds, text, per_image, m.extract_feature(tile)[0]

    out = compute(params, jnp.asarray(ids[None]), packed, alone, jnp.asarray(images[2][None]))
    embeds, text, per_image, fixed = jax.tree.map(np.asarray, out)
    is_ctx = ids == CTX
    np.testing.assert_array_equal(embeds[~is_ctx], text[~is_ctx])
    got = embeds[is_ctx]
    np.testing.assert_allclose(got, np.concatenate(per_image), rtol=0, atol=1e-5)
    assert np.abs(got[-TOK:] - fixed).max() <= 1e-5  # 448x448 AnyRes == the fixed tile path


def test_anyres_packed_samples_equal_separate(params):
    """Two samples, each with its own image, packed in one text row and one ViT row, equal each alone."""
    im_a, im_b = _images([(56, 84), (224, 168)], 18)  # 6 and 48 LLM tokens
    a = _sample([_text(4, 19), 6, _text(5, 20)])
    b = _sample([_text(3, 21), 48, _text(6, 22)])
    n = len(a) + len(b)

    def run(samples, images):
        ids, seg, pos = _row(samples, n)
        batch = pack_images(images, CFG.vision, length=256)
        return np.asarray(_logits(params, ids, segment_ids=seg, positions=pos, images=batch))[0]

    packed, alone_a, alone_b = run([a, b], [im_a, im_b]), run([a], [im_a]), run([b], [im_b])
    assert np.abs(packed[: len(a)] - alone_a[: len(a)]).max() <= 1e-5
    assert np.abs(packed[len(a):] - alone_b[: len(b)]).max() <= 1e-5


def test_anyres_input_errors(params):
    ids = jnp.asarray(_sample([_text(2, 23), 2])[None])
    packed = pack_images(_images([(28, 56)], 24), CFG.vision)
    with pytest.raises(ValueError, match="not both"):
        MODEL.apply(params, ids, jnp.zeros((1, 3, 448, 448)), images=packed)
    with pytest.raises(ValueError, match="needs 4"):
        MODEL.apply(params, ids, images=pack_images(_images([(42, 42)], 25), CFG.vision, scale=3))
    with pytest.raises(ValueError, match="this ViT needs 588"):
        bad = dataclasses.replace(packed, patches=packed.patches[..., :100])
        MODEL.apply(params, ids, images=bad, method=lambda m, i, images: m.vision_model.anyres(images))


def test_select_layer_reaches_anyres(params):
    """select_layer=-2 feeds block 0's raw output (no final norm) to the adapter in AnyRes mode too."""
    packed = pack_images(_images([(56, 56)], 26), CFG.vision)
    vit = SailViT(CFG.vision, CFG.runtime, select_layer=-2)
    vp = {"params": params["params"]["vision_model"]}
    out = jax.jit(lambda p, b: vit.apply(p, b, return_hidden_states=True, method=SailViT.anyres))(vp, packed)
    np.testing.assert_array_equal(np.asarray(out.selected), np.asarray(out.hidden_states[0]))
    assert np.abs(np.asarray(out.selected) - np.asarray(out.last_hidden_state)).max() > 1e-2


@pytest.mark.parametrize("init_std", [0.02, 0.0625])
def test_adapter_init_std(init_std):
    """`AdapterConfig.init_std` sets the N(0, std) init of both adapter Linears (biases stay zero); configs.demo.gin
    raises it so the adapter's GELU starts in its nonlinear range."""
    adapter = PixelShuffleAdapter(AdapterConfig(init_std=init_std), out_features=256)
    x = np.zeros((1, 64, 128), np.float32)  # 8x8 grid of width-128 ViT tokens
    p = adapter.init(jax.random.PRNGKey(0), x, (8, 8))["params"]
    for name, fan_in in (("linear_1", 512), ("linear_2", 256)):
        kernel = np.asarray(nn.unbox(p[name]["kernel"]))
        assert kernel.shape == (fan_in, 256)
        assert abs(kernel.std() / init_std - 1) < 0.02
        np.testing.assert_array_equal(np.asarray(nn.unbox(p[name]["bias"])), 0)
