"""Runtime knobs change how the model runs, never what it computes: remat policies and scan layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sail_jax.config import ConfigError, LLMConfig, RuntimeConfig
from sail_jax.models.qwen3 import Qwen3ForCausalLM

CFG = LLMConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                head_dim=8)


def _loss_and_grads(rt: RuntimeConfig, params=None):
    lm = Qwen3ForCausalLM(CFG, rt)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16)), jnp.int32)
    if params is None:
        params = lm.init(jax.random.PRNGKey(0), ids)

    def loss(p):
        logits = lm.apply(p, ids).logits
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    return params, jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan, policy", [(False, "full"), (True, "dots_saveable")])
def test_remat_policies_same_loss_and_grads(scan, policy):
    params, (l0, g0) = _loss_and_grads(RuntimeConfig(scan_layers=scan))
    _, (l1, g1) = _loss_and_grads(RuntimeConfig(scan_layers=scan, remat_policy=policy), params)
    assert abs(float(l0) - float(l1)) < 1e-6
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bad_runtime_values_name_the_field():
    with pytest.raises(ConfigError, match="remat_policy"):
        RuntimeConfig(remat_policy="sometimes")
    with pytest.raises(ConfigError, match="attention_impl"):
        RuntimeConfig(attention_impl="cudnn")
    with pytest.raises(ConfigError, match="num_heads"):
        LLMConfig(num_heads=6, num_kv_heads=4)


def test_query_chunks_bound_attention_memory_in_the_backward_pass_too():
    """`attention_q_chunk` splits the XLA attention by query rows: same output and gradients as one block, and the
    backward pass keeps one chunk's scores at a time (each chunk is recomputed), not every chunk's."""
    from sail_jax.layers.attention import xla_attention

    rng = np.random.default_rng(0)
    b, t, hq, hkv, d = 1, 1024, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for h in (hq, hkv, hkv))
    seg = jnp.asarray(np.repeat([1, 2], [700, t - 700])[None], jnp.int32)
    cot = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)

    def grads(chunk):
        f = lambda q, k, v: jnp.vdot(xla_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                                   q_chunk=chunk)[0], cot)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    whole, chunked = grads(t), grads(128)
    for a, c in zip(whole(q, k, v), chunked(q, k, v)):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=1e-5)
    temp = lambda fn: fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    scores = b * hq * t * t * 4  # one [Tq, Tk] float32 score matrix for all heads
    assert temp(whole) > 2 * scores
    assert temp(chunked) < temp(whole) / 4  # (keeping every chunk's residuals: about the same as whole)


@pytest.mark.parametrize("causal", [True, False])
def test_cpu_row_blocks_give_the_whole_batch_result(monkeypatch, causal):
    """On XLA:CPU a large batch runs in blocks of rows (`CPU_SCORE_BLOCK`): outputs, log-sum-exps and gradients
    equal the one-block computation, for GQA, padded rows, a fully padded row and a batch of 6 (blocks of 2)."""
    from sail_jax.layers import attention

    rng = np.random.default_rng(1)
    b, t, hq, hkv, d = 6, 64, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for h in (hq, hkv, hkv))
    seg = np.ones((b, t), np.int32)
    seg[1, 40:], seg[2, :10], seg[3] = 0, 2, 0
    seg = jnp.asarray(seg)
    cot = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)

    def run():
        def f(q, k, v):
            o, lse = attention.xla_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal)
            return jnp.vdot(o, cot), (o, lse)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (g_whole, (o_whole, lse_whole)) = run()
    monkeypatch.setattr(attention, "CPU_SCORE_BLOCK", 2 * hq * t * t)  # two rows per block
    assert attention._row_block(b, hq * t * t) == 2
    (g_blocks, (o_blocks, lse_blocks)) = run()
    np.testing.assert_allclose(np.asarray(o_blocks), np.asarray(o_whole), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.isinf(lse_blocks), np.isinf(lse_whole))
    finite = np.isfinite(np.asarray(lse_whole))
    np.testing.assert_allclose(np.asarray(lse_blocks)[finite], np.asarray(lse_whole)[finite], rtol=1e-6)
    for a, c in zip(g_whole, g_blocks):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=1e-6)
