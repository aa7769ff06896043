"""The tiny dense Qwen3 with `attention_impl="pallas"` (interpret mode on CPU) equals the XLA attention path:
forward logits and every parameter gradient, on a packed batch with segment ids, padding and restarted positions."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sail_jax.config import LLMConfig, RuntimeConfig
from sail_jax.models.qwen3 import Qwen3ForCausalLM
from tests.pallas_testing import interpret_jit

CFG = LLMConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, rope_theta=1e4, max_position_embeddings=512)
T = 80


def _packed_batch():
    """Row 0: three documents + padding; row 1: one long document + padding. Positions restart per document."""
    rng = np.random.default_rng(0)
    seg, pos = np.zeros((2, T), np.int32), np.zeros((2, T), np.int32)
    for row, lengths in enumerate(([30, 25, 20], [61])):
        start = 0
        for sid, n in enumerate(lengths, 1):
            seg[row, start:start + n] = sid
            pos[row, start:start + n] = np.arange(n)
            start += n
    ids = np.where(seg > 0, rng.integers(1, CFG.vocab_size, (2, T)), 0).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos)


def _random_params(sample_ids, cfg: LLMConfig = CFG):
    """Random weights from the param shapes (compiling flax init costs more CPU than the whole comparison)."""
    rng = np.random.default_rng(2)
    abstract = jax.eval_shape(Qwen3ForCausalLM(cfg, RuntimeConfig()).init, jax.random.PRNGKey(0), sample_ids)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else 0.1 * noise)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _loss_and_grads(impl: str, params, ids, seg, pos, cfg: LLMConfig = CFG, moe_impl: str = "ragged_dot"):
    lm = Qwen3ForCausalLM(cfg, RuntimeConfig(attention_impl=impl, moe_impl=moe_impl))
    weights = jax.random.normal(jax.random.PRNGKey(1), (2, T, CFG.vocab_size)) * (seg > 0)[..., None]

    def loss(p):
        logits = lm.apply(p, ids, segment_ids=seg, positions=pos).logits
        return jnp.sum(logits * weights) / jnp.sum(seg > 0), logits

    fn = interpret_jit(jax.value_and_grad(loss, has_aux=True))
    jaxpr = str(jax.make_jaxpr(loss)(params))
    return fn(params), jaxpr


def test_pallas_attention_model_matches_xla():
    ids, seg, pos = _packed_batch()
    params = _random_params(ids[:, :8])
    ((loss_x, logits_x), grads_x), jaxpr_x = _loss_and_grads("xla", params, ids, seg, pos)
    ((loss_p, logits_p), grads_p), jaxpr_p = _loss_and_grads("pallas", params, ids, seg, pos)
    assert "pallas_call" in jaxpr_p and "pallas_call" not in jaxpr_x  # the kernel really ran
    np.testing.assert_allclose(np.asarray(logits_p), np.asarray(logits_x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=0, atol=1e-5)
    flat_x, tree_x = jax.tree.flatten(grads_x)
    flat_p, tree_p = jax.tree.flatten(grads_p)
    assert tree_x == tree_p and len(flat_x) > 10
    for gx, gp in zip(flat_x, flat_p):
        scale = max(1.0, float(jnp.abs(gx).max()))
        np.testing.assert_allclose(np.asarray(gp) / scale, np.asarray(gx) / scale, rtol=0, atol=1e-5)
    assert float(jnp.abs(flat_p[0]).max()) > 0


def _assert_same(result_p, result_x) -> None:
    ((loss_p, logits_p), grads_p), ((loss_x, logits_x), grads_x) = result_p, result_x
    np.testing.assert_allclose(np.asarray(logits_p), np.asarray(logits_x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=0, atol=1e-5)
    for gx, gp in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_p), strict=True):
        scale = max(1.0, float(jnp.abs(gx).max()))
        np.testing.assert_allclose(np.asarray(gp) / scale, np.asarray(gx) / scale, rtol=0, atol=1e-5)


def test_pallas_moe_and_attention_model_matches_xla():
    """Tiny MoE model: `moe_impl="pallas"` (routing and gmm/tgmm kernels) + pallas attention equals jnp routing,
    ragged_dot and XLA attention (values and every gradient, the router's included)."""
    from sail_jax.config import MoEConfig

    cfg = dataclasses.replace(
        CFG, moe=MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=(1,))
    )
    ids, seg, pos = _packed_batch()
    params = _random_params(ids[:, :8], cfg)
    ref, jaxpr_x = _loss_and_grads("xla", params, ids, seg, pos, cfg, "ragged_dot")
    ours, jaxpr_p = _loss_and_grads("pallas", params, ids, seg, pos, cfg, "pallas")
    assert jaxpr_p.count("pallas_call") >= 3 and "pallas_call" not in jaxpr_x  # attention, routing, gmm
    _assert_same(ours, ref)


def test_pallas_attention_sharded_on_a_mesh_equals_single_device():
    """Under a data x fsdp x tensor mesh the kernel runs per shard (shard_map) and equals one device."""
    from sail_jax.sharding import batch_sharding, make_mesh, tree_shardings, use_mesh

    ids, seg, pos = _packed_batch()
    ids, seg, pos = (jnp.concatenate([a, a[::-1]]) for a in (ids, seg, pos))  # batch 4 over data x fsdp
    params = _random_params(ids[:, :8])
    lm = Qwen3ForCausalLM(CFG, RuntimeConfig(attention_impl="pallas"))
    ref = interpret_jit(lambda p: lm.apply(p, ids, segment_ids=seg, positions=pos).logits)(params)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    boxed = jax.eval_shape(lm.init, jax.random.PRNGKey(0), ids[:, :8])
    with use_mesh(mesh):
        sharded = jax.device_put(params, tree_shardings(boxed, mesh))
        put = lambda a: jax.device_put(a, batch_sharding(mesh, a.shape))
        fwd = lambda p, i, s, q: lm.apply(p, i, segment_ids=s, positions=q).logits
        args = (sharded, put(ids), put(seg), put(pos))
        assert "shard_map" in str(jax.make_jaxpr(fwd)(*args))
        out = interpret_jit(fwd)(*args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5)
