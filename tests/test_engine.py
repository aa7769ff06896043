"""KV-cache engine: parity with the original implementation's greedy tokens and with full recomputation, batching
(different lengths and image counts) equal to one-by-one, sampling, stop tokens, streaming, tensor parallelism, MoE."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from PIL import Image, ImageDraw

from converters.load import load_checkpoint
from sail_jax.config import LLMConfig, RuntimeConfig
from sail_jax.data.chat import vlmevalkit_prompt
from sail_jax.data.processor import SailProcessor
from sail_jax.inference.engine import Engine, Request, _distinct, bucket, shard_params
from sail_jax.inference.sampling import SamplerKind, SamplingParams, sample
from sail_jax.models.qwen3 import Qwen3ForCausalLM
from sail_jax.models.sail_vl import SailVL
from sail_jax.sharding import make_mesh
from tests.conftest import DATA
from tests.greedy_reference import greedy_full_recompute

FIX = DATA / "sailvl2-tiny"
SMALL = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=16, num_kv_heads=8,
                  head_dim=8)


def shape_image(color: str, size: tuple[int, int] = (448, 448), shape: str = "circle") -> Image.Image:
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return img


def bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.fixture(scope="module")
def vl():
    cfg, params = load_checkpoint(FIX / "checkpoint", RuntimeConfig())
    model = SailVL(cfg)
    engine = Engine(model, params, decode_steps=4, tile_chunk=1)
    return model, params, engine, SailProcessor.from_dir(FIX / "checkpoint")


@pytest.fixture(scope="module")
def vl_requests(vl):
    """Three prompts: one image (1 tile), text only, two images (VLMEvalKit multi-image form): different lengths."""
    *_, proc = vl
    one = proc(images=[shape_image("red")], prompt="What colour is the circle?")
    text = proc(prompt="Say something short.")
    two_imgs = [shape_image("blue", shape="square"), shape_image("green")]
    msg = [{"type": "image", "value": None}] * 2 + [{"type": "text", "value": "Compare the two shapes."}]
    two = proc(images=two_imgs, prompt=vlmevalkit_prompt(msg))
    reqs = [Request(one["input_ids"][0], one["pixel_values"]), Request(text["input_ids"][0]),
            Request(two["input_ids"][0], two["pixel_values"])]
    assert len({len(r.input_ids) for r in reqs}) == 3 and [len(two["num_patches_list"])] == [2]
    return reqs


def test_fixture_greedy_equals_original_implementation(vl):
    model, params, _, _ = vl
    inputs, ref = dict(np.load(FIX / "inputs.npz")), dict(np.load(FIX / "outputs.npz"))
    engine = Engine(model, params, decode_steps=8, tile_chunk=1)
    [out] = engine.generate([Request(inputs["input_ids"][0], inputs["pixel_values"])],
                            SamplingParams(max_new_tokens=16), return_logits=True)
    assert out.token_ids == ref["generated_ids"][0].tolist()
    assert out.finish_reason == "length" and out.step_logits.shape == (16, 151936)
    # every step's logits against the original's KV-cached generate
    top5 = np.sort(out.step_logits, -1)[:, ::-1][:, :5]
    assert np.abs(top5 - ref["generation_step_logits_top5_values"]).max() <= 1e-4
    lse = np.asarray(jax.nn.logsumexp(out.step_logits, -1))
    assert np.abs(lse - ref["generation_step_logits_logsumexp"]).max() <= 1e-4


def test_cached_decode_equals_full_recompute(vl, vl_requests):
    model, params, engine, _ = vl
    req = vl_requests[0]
    [out] = engine.generate([req], SamplingParams(max_new_tokens=8), return_logits=True)
    tokens, logits = greedy_full_recompute(model, params, req.input_ids, bf16(req.pixel_values), 8)
    assert out.token_ids == tokens
    assert np.abs(out.step_logits - logits).max() <= 1e-4


def test_batched_equals_one_by_one(vl, vl_requests):
    _, _, engine, _ = vl
    sp = SamplingParams(max_new_tokens=8)
    batched = engine.generate(vl_requests, sp, return_logits=True)
    for req, got in zip(vl_requests, batched):
        [alone] = engine.generate([req], sp, return_logits=True)
        assert got.token_ids == alone.token_ids
        assert np.abs(got.step_logits - alone.step_logits).max() <= 1e-4


def test_image_count_mismatch_names_the_request(vl, vl_requests):
    _, _, engine, _ = vl
    bad = Request(vl_requests[0].input_ids, None)
    with pytest.raises(ValueError, match=r"request 1: 256 <IMG_CONTEXT> tokens but 0 image features"):
        engine.generate([vl_requests[1], bad], SamplingParams(max_new_tokens=2))


# ------------------------------------------------------------------------------------ text-only LLM (vocab 512)


def small_lm(cfg: LLMConfig = SMALL, seed: int = 0):
    lm = Qwen3ForCausalLM(cfg, RuntimeConfig())
    params = nn.unbox(lm.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32)))
    # Larger weights than the 0.02 init: decisive logits, so greedy choices are not rounding-sensitive.
    return lm, jax.tree.map(lambda x: x * 4, params)


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(lm, params, buf, length):
    seg = (jnp.arange(buf.shape[1]) < length).astype(jnp.int32)[None]
    return jax.lax.dynamic_index_in_dim(lm.apply(params, buf, segment_ids=seg).logits[0], length - 1, 0, False)


def full_recompute(lm, params, prompt: np.ndarray, steps: int, total: int = 48) -> tuple[list[int], np.ndarray]:
    """Greedy by re-running the whole sequence (no cache) in one static buffer; [steps, V] logits."""
    buf = np.zeros((1, total), np.int32)
    buf[0, : len(prompt)] = prompt
    tokens, logits = [], []
    for i in range(steps):
        row = np.asarray(_last_logits(lm, params, buf, len(prompt) + i))
        logits.append(row)
        tokens.append(int(row.argmax()))
        buf[0, len(prompt) + i] = tokens[-1]
    return tokens, np.stack(logits)


@pytest.fixture(scope="module")
def text_lm():
    """Prompts of different lengths that share one prompt bucket (32), so solo runs reuse compiled programs."""
    lm, params = small_lm()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, SMALL.vocab_size, n).astype(np.int32) for n in (17, 29, 23)]
    engine = Engine(lm, params, decode_steps=4)
    greedy = engine.generate([Request(p) for p in prompts], SamplingParams(max_new_tokens=10), return_logits=True)
    return lm, params, engine, prompts, greedy


def test_text_llm_equals_full_recompute(text_lm):
    lm, params, _, prompts, greedy = text_lm
    for p, out in zip(prompts, greedy):
        tokens, logits = full_recompute(lm, params, p, 10)
        assert out.token_ids == tokens
        assert np.abs(out.step_logits - logits).max() <= 1e-4


def test_sampling_seeded_and_batch_independent(text_lm):
    _, _, engine, prompts, greedy = text_lm
    reqs = [Request(p) for p in prompts]
    hot = SamplingParams(max_new_tokens=10, temperature=1.5, seed=3)
    a = [c.token_ids for c in engine.generate(reqs, hot)]
    assert a == [c.token_ids for c in engine.generate(reqs, hot)]  # same seed, same tokens
    assert a != [c.token_ids for c in engine.generate(reqs, dataclasses.replace(hot, seed=4))]
    assert a != [c.token_ids for c in greedy]
    # per-request seeds make a row's samples independent of its batch
    seeded = [dataclasses.replace(r, seed=10 + i) for i, r in enumerate(reqs)]
    batched = [c.token_ids for c in engine.generate(seeded, hot)]
    assert batched == [engine.generate([r], hot)[0].token_ids for r in seeded]


def test_logprobs_are_log_softmax_of_the_step_logits(text_lm):
    """Sampled: log softmax(logits / T) of each returned token, the same from the streamed calls (with logits) and
    the one device loop (without); greedy: at temperature 1."""
    _, _, engine, prompts, greedy = text_lm
    reqs = [Request(p, seed=i) for i, p in enumerate(prompts)]
    hot = SamplingParams(max_new_tokens=10, temperature=1.5, seed=3)
    streamed = engine.generate(reqs, hot, return_logits=True, return_logprobs=True)
    loop = engine.generate(reqs, hot, return_logprobs=True)
    for a, b in zip(streamed, loop):
        want = np.asarray(jax.nn.log_softmax(a.step_logits / 1.5, -1))[np.arange(len(a.token_ids)), a.token_ids]
        np.testing.assert_allclose(a.logprobs, want, atol=1e-5)
        assert a.token_ids == b.token_ids and b.step_logits is None
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-6)
    cold = engine.generate(reqs, SamplingParams(max_new_tokens=10), return_logprobs=True)
    for c, g in zip(cold, greedy):
        want = np.asarray(jax.nn.log_softmax(g.step_logits, -1))[np.arange(10), g.token_ids]
        assert c.token_ids == g.token_ids
        np.testing.assert_allclose(c.logprobs, want, atol=1e-5)


def test_stop_tokens_max_new_tokens_and_streaming(text_lm):
    _, _, engine, prompts, greedy = text_lm
    free = [c.token_ids for c in greedy]
    k = next(i for i in range(2, 10) if free[0][i] not in free[0][:i] and all(free[0][i] not in f for f in free[1:]))
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    calls = []

    def on_tokens(row: int, ids: list[int]) -> None:
        streamed[row].extend(ids)
        calls.append(row)

    sp = SamplingParams(max_new_tokens=10, stop_token_ids=(free[0][k],))
    out = engine.generate([Request(p) for p in prompts], sp, on_tokens=on_tokens, return_logits=True)
    assert out[0].token_ids == free[0][: k + 1] and out[0].finish_reason == "stop"
    assert [o.token_ids for o in out[1:]] == free[1:] and out[1].finish_reason == "length"
    assert streamed == {i: o.token_ids for i, o in enumerate(out)}
    assert calls.count(1) == 1 + 3  # the prefill token, then 3 decode calls of 4 steps for 9 more tokens


def test_sample_distribution():
    """Empirical frequencies of `sample` against softmax(logits / T) and the top-k / top-p renormalised sets."""
    rng = np.random.default_rng(0)
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0]])

    @functools.partial(jax.jit, static_argnums=0)
    def draws(kind, t, p):
        return jax.vmap(lambda k: sample(logits, k[None], kind, t, p)[0])(keys)

    def freq(kind, t, p=1.0):
        return np.bincount(np.asarray(draws(kind, jnp.float32(t), jnp.float32(p))), minlength=5) / n

    plain = SamplerKind(greedy=False, top_k=0, top_p=False)
    for t in (0.5, 1.0, 3.0):
        assert np.abs(freq(plain, t) - np.asarray(jax.nn.softmax(logits[0] / t))).max() < 0.03
    assert freq(plain, 0.05)[0] > 0.99  # low temperature concentrates on the argmax
    got = freq(SamplerKind(False, 2, False), 1.0)
    assert got[2:].sum() == 0 and np.abs(got[:2] - np.asarray(jax.nn.softmax(logits[0, :2]))).max() < 0.03
    probs = np.asarray(jax.nn.softmax(logits[0]))  # 0.61, 0.22, ...: top-p 0.7 keeps two tokens
    for kind in (SamplerKind(False, 0, True), SamplerKind(False, 4, True)):
        got = freq(kind, 1.0, 0.7)
        assert got[2:].sum() == 0 and np.abs(got[:2] - probs[:2] / probs[:2].sum()).max() < 0.03
    # top-k = 1, and a top-p that keeps only the most likely token, are greedy whatever the temperature
    wide = jnp.asarray(rng.normal(size=(6, 512)) * 3, jnp.float32)
    pick = jax.jit(functools.partial(sample, wide, keys[:6]), static_argnums=0)
    argmax = np.argmax(wide, -1)
    np.testing.assert_array_equal(pick(SamplerKind(True, 0, False), jnp.float32(1), jnp.float32(1)), argmax)
    for kind, p in ((SamplerKind(False, 1, False), 1.0), (SamplerKind(False, 0, True), 1e-6),
                    (SamplerKind(False, 8, True), 1e-6)):
        np.testing.assert_array_equal(pick(kind, jnp.float32(2.0), jnp.float32(p)), argmax)


def test_bucket_sizes():
    assert [bucket(n) for n in (1, 16, 17, 20, 100, 313, 1849, 2048, 2049)] == [16, 16, 32, 32, 112, 320, 2048,
                                                                               2048, 2560]
    for n in range(1, 5000, 7):
        assert n <= bucket(n) <= max(n * 1.25, n + 15)


def test_tensor_parallel_generation_equals_single_device(text_lm):
    lm, params, _, prompts, greedy = text_lm
    engine = Engine(lm, params, mesh=make_mesh(tensor=8), decode_steps=4)
    emb = engine.params["params"]["embed_tokens"]["embedding"]
    assert "tensor" in str(emb.sharding.spec) and len(emb.sharding.device_set) == 8
    q = engine.params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (SMALL.hidden_size, SMALL.num_heads // 8, SMALL.head_dim)
    got = engine.generate([Request(p) for p in prompts], SamplingParams(max_new_tokens=10), return_logits=True)
    for a, b in zip(got, greedy):
        assert a.token_ids == b.token_ids
        assert np.abs(a.step_logits - b.step_logits).max() <= 1e-4


def test_vision_language_params_shard_on_a_mesh(vl):
    """Every SailVL parameter has a valid logical sharding (the ViT patch kernel once repeated an axis name)."""
    model, params, _, _ = vl
    sharded = shard_params(model, params, make_mesh(tensor=2))
    emb = sharded["params"]["language_model"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec[0] == "tensor" and len(emb.sharding.device_set) == 2
    assert sharded["params"]["vision_model"]["patch_proj"]["kernel"].shape == (14, 14, 3, 64)


def test_moe_engine_equals_full_recompute():
    from sail_jax.config import get_preset

    cfg = dataclasses.replace(get_preset("tiny-moe").llm, vocab_size=512)
    lm, params = small_lm(cfg, seed=1)
    engine = Engine(lm, params, decode_steps=4)
    prompts = [np.arange(3, 12, dtype=np.int32), np.arange(40, 45, dtype=np.int32)]
    outs = engine.generate([Request(p) for p in prompts], SamplingParams(max_new_tokens=6), return_logits=True)
    for p, out in zip(prompts, outs):
        tokens, logits = full_recompute(lm, params, p, 6)
        assert out.token_ids == tokens
        assert np.abs(out.step_logits - logits).max() <= 1e-4


def test_shared_prompts_sample_like_separate_requests(text_lm):
    """n seeded samples of each prompt: one prefill per prompt (cache copied to its rows), the same tokens as each
    request alone, in one device loop and when streamed; the stop token ends rows early in both."""
    _, _, engine, prompts, greedy = text_lm
    reqs = [Request(p, seed=10 * i + j) for i, p in enumerate(prompts) for j in range(3)]
    stop = greedy[0].token_ids[3]
    hot = SamplingParams(max_new_tokens=10, temperature=1.5, seed=5, stop_token_ids=(stop,))
    alone = [engine.generate([r], hot)[0] for r in reqs]
    streamed: dict[int, list[int]] = {i: [] for i in range(len(reqs))}
    for got in (engine.generate(reqs, hot),
                engine.generate(reqs, hot, on_tokens=lambda row, ids: streamed[row].extend(ids))):
        assert [(c.token_ids, c.finish_reason) for c in got] == [(c.token_ids, c.finish_reason) for c in alone]
    assert streamed == {i: c.token_ids for i, c in enumerate(alone)}
    assert len({tuple(c.token_ids) for c in alone[:3]}) > 1  # the samples of one prompt differ
    cold = SamplingParams(max_new_tokens=10, stop_token_ids=(stop,))
    shared = engine.generate([Request(prompts[0])] * 2 + [Request(prompts[1])], cold)
    assert [c.token_ids for c in shared] == [greedy[0].token_ids[:4]] * 2 + [greedy[1].token_ids]
    assert [c.finish_reason for c in shared] == ["stop", "stop", "length"]


def test_shared_image_prompt_equals_alone(vl, vl_requests):
    _, _, engine, _ = vl
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, seed=2)
    one, text = vl_requests[0], vl_requests[1]
    reqs = [dataclasses.replace(one, seed=s) for s in (1, 2)] + [dataclasses.replace(text, seed=3)]
    got = [c.token_ids for c in engine.generate(reqs, sp)]
    assert got == [engine.generate([r], sp)[0].token_ids for r in reqs]


def test_prompts_are_shared_by_equal_ids_and_the_same_pixel_object():
    ids, pix = np.arange(5), np.zeros((1, 3, 4, 4), np.float32)
    reqs = [Request(ids, pix, seed=1), Request(ids.copy(), pix, seed=2), Request(ids, pix.copy()), Request(ids),
            Request(ids.astype(np.int64)), Request(ids + 1)]
    assert _distinct(reqs) == ([0, 2, 3, 5], [0, 0, 1, 2, 2, 3])
