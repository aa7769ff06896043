"""Qwen3-MoE block vs transformers `Qwen3MoeForCausalLM`, plus routing, capacity, loss and kernel checks."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sail_jax.config import ConfigError, LLMConfig, MoEConfig, RuntimeConfig, get_preset
from sail_jax.layers.grouped_matmul import grouped_matmul
from sail_jax.layers.moe import MoEBlock
from sail_jax.layers.moe_dispatch import all_experts_reference
from sail_jax.models.qwen3 import Qwen3ForCausalLM
from sail_jax.sharding import abstract_params, count_params
from sail_jax.training.moe_loss import (
    load_balancing_loss,
    moe_metrics,
    router_z_loss,
    weighted_router_loss,
)
from tests.torch_refs import llm_config_from_torch, torch_llm_params

E, K, D, I_MOE = 8, 2, 32, 24
ALL = jnp.ones((30, K), bool)  # every slot of the 3x10 test batch kept


def _hf_model(norm_topk_prob: bool, mlp_only_layers: list[int], layers: int):
    """Tiny random Qwen3-MoE: GQA, eager attention, perturbed norms, a router scaled up so top-k is decisive."""
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=D, intermediate_size=48, moe_intermediate_size=I_MOE, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=E, num_experts_per_tok=K,
        mlp_only_layers=mlp_only_layers, norm_topk_prob=norm_topk_prob, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = transformers.Qwen3MoeForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.mul_(50.0)
    return model, llm_config_from_torch(hf_cfg)


def _ours(model, cfg: LLMConfig, rt: RuntimeConfig):
    lm = Qwen3ForCausalLM(cfg, rt)
    abstract = abstract_params(lm, jnp.zeros((1, 4), jnp.int32))["params"]
    params = torch_llm_params(model, cfg, abstract, scanned=rt.scan_layers)
    return lm, {"params": jax.tree.map(jnp.asarray, params)}


def _compare(model, cfg, rt):
    """Logits (non-padding positions) and aux loss vs transformers, without and with a padding mask."""
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 24))
    lm, params = _ours(model, cfg, rt)
    fwd = jax.jit(lambda p, i, s: lm.apply(p, i, segment_ids=s))
    outs = []
    for padded in (False, True):
        mask = np.ones_like(ids)
        if padded:
            mask[1, 17:] = 0
        with torch.no_grad():
            ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if padded else None,
                        output_router_logits=True)
        out = fwd(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
        keep = mask.astype(bool)
        assert np.abs(np.asarray(out.logits)[keep] - ref.logits.numpy()[keep]).max() <= 1e-4
        assert abs(float(load_balancing_loss(out.aux, cfg.moe)) - float(ref.aux_loss)) <= 1e-5
        outs.append(out)
    # the padding really changes the loss, so the masked comparison is not vacuous
    losses = [float(load_balancing_loss(o.aux, cfg.moe)) for o in outs]
    assert abs(losses[0] - losses[1]) > 1e-4
    return params, outs[1]


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_with_a_dense_layer(norm_topk_prob):
    model, cfg = _hf_model(norm_topk_prob, mlp_only_layers=[1], layers=3)
    assert cfg.moe.norm_topk_prob is norm_topk_prob and [cfg.is_moe_layer(i) for i in range(3)] == [True, False, True]
    params, out = _compare(model, cfg, RuntimeConfig())
    p = params["params"]
    assert "gate_proj" in p["layers_1"]["mlp"] and "experts" not in p["layers_1"]["mlp"]
    assert p["layers_2"]["mlp"]["experts"]["down_proj"].shape == (E, I_MOE, D)
    assert out.aux["expert_counts"].shape == (2, E)  # one row per MoE layer
    np.testing.assert_allclose(np.asarray(out.aux["num_tokens"]), [41, 41])
    np.testing.assert_allclose(np.asarray(out.aux["expert_counts"]).sum(-1), [41 * K] * 2)


def test_scanned_all_moe_matches_transformers():
    model, cfg = _hf_model(True, mlp_only_layers=[], layers=2)
    _compare(model, cfg, RuntimeConfig(scan_layers=True, moe_impl="tiled"))


def _block(rt: RuntimeConfig = RuntimeConfig(), **moe_kw):
    """A lone MoEBlock, random params (numpy, no init compile), x [3,10,D] with 4 padding tokens."""
    moe = MoEConfig(num_experts=E, num_experts_per_tok=K, moe_intermediate_size=I_MOE, **moe_kw)
    cfg = LLMConfig(vocab_size=64, hidden_size=D, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, moe=moe)
    rng = np.random.default_rng(0)

    def w(*shape, std=0.2):
        return jnp.asarray(std * rng.normal(size=shape), jnp.float32)

    params = {"params": {"gate": {"kernel": w(D, E, std=1.0)}, "experts": {
        "gate_proj": w(E, D, I_MOE), "up_proj": w(E, D, I_MOE), "down_proj": w(E, I_MOE, D)}}}
    x = jnp.asarray(rng.normal(size=(3, 10, D)), jnp.float32)
    mask = jnp.ones((3, 10), bool).at[2, 6:].set(False)
    return MoEBlock(cfg, rt), params, x, mask


@functools.cache
def _apply(block: MoEBlock):
    """One jitted apply per (cfg, rt), shared by the tests."""
    return jax.jit(block.apply)


@functools.partial(jax.jit, static_argnums=3)
def _reference(params, x, mask, norm_topk_prob: bool, keep):
    """All-experts computation with the block's own routing; `keep` [N,k] masks the surviving slots."""
    p = params["params"]
    xf = x.reshape(-1, D)
    probs = jax.nn.softmax(xf @ p["gate"]["kernel"], axis=-1)
    top_w, top_idx = jax.lax.top_k(probs, K)
    if norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdims=True)
    top_w = jnp.where(keep, top_w, 0.0)
    ex = p["experts"]
    y = all_experts_reference(xf, top_idx, top_w, ex["gate_proj"], ex["up_proj"], ex["down_proj"])
    return y.reshape(x.shape), top_idx


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled"])
def test_skewed_routing_matches_all_experts_reference(impl):
    block, params, x, mask = _block(RuntimeConfig(moe_impl=impl))
    # Every token's first choice is expert 5 and its second expert 2; the other six experts get no tokens.
    kernel = jnp.zeros((D, E)).at[:, 5].set(1.0).at[:, 2].set(0.5)
    params["params"]["gate"]["kernel"] = kernel
    x = jnp.abs(x)  # positive inputs make the column sums order the logits
    y, aux = _apply(block)(params, x, mask)
    ref, top_idx = _reference(params, x, mask, block.cfg.moe.norm_topk_prob, ALL)
    assert set(np.asarray(top_idx).reshape(-1)) == {5, 2}
    m = np.asarray(mask)
    assert np.abs(np.asarray(y)[m] - np.asarray(ref)[m]).max() <= 1e-5
    assert np.all(np.asarray(y)[~m] == 0)  # padding tokens take no expert work
    counts = np.asarray(aux["expert_counts"])
    assert counts[5] == counts[2] == m.sum() and counts.sum() == 2 * m.sum()


def test_random_routing_matches_reference_and_padding_is_inert():
    block, params, x, mask = _block()
    y, aux = _apply(block)(params, x, mask)
    ref, _ = _reference(params, x, mask, block.cfg.moe.norm_topk_prob, ALL)
    m = np.asarray(mask)
    assert np.abs(np.asarray(y)[m] - np.asarray(ref)[m]).max() <= 1e-5
    # Replacing the padding tokens changes neither the routing statistics nor the real tokens' outputs.
    x2 = jnp.where(mask[..., None], x, 100.0 * jax.random.normal(jax.random.PRNGKey(7), x.shape))
    y2, aux2 = _apply(block)(params, x2, mask)
    np.testing.assert_array_equal(np.asarray(y2)[m], np.asarray(y)[m])
    for k in aux:
        np.testing.assert_allclose(np.asarray(aux2[k]), np.asarray(aux[k]), rtol=1e-6)


def _gshard_keep(top_idx: np.ndarray, mask: np.ndarray, cap: int) -> np.ndarray:
    """Capacity in GShard order: all first choices (token order) before all second choices."""
    keep = np.zeros(top_idx.shape, bool)
    used = np.zeros(E, int)
    for slot in range(top_idx.shape[1]):
        for t in range(top_idx.shape[0]):
            e = top_idx[t, slot]
            if mask[t] and used[e] < cap:
                keep[t, slot] = True
                used[e] += 1
    return keep


def test_capacity_factor_drops_in_gshard_order():
    block, params, x, mask = _block(capacity_factor=0.5)
    y, aux = _apply(block)(params, x, mask)
    ref_full, top_idx = _reference(params, x, mask, block.cfg.moe.norm_topk_prob, ALL)
    cap = int(np.ceil(30 * K / E * 0.5))  # 30 token slots (padding included: the shape is static)
    keep = _gshard_keep(np.asarray(top_idx), np.asarray(mask).reshape(-1), cap)
    ref, _ = _reference(params, x, mask, block.cfg.moe.norm_topk_prob, keep=jnp.asarray(keep))
    m = np.asarray(mask)
    assert np.isfinite(np.asarray(y)).all()
    assert np.abs(np.asarray(y)[m] - np.asarray(ref)[m]).max() <= 1e-5
    dropped = int(m.sum() * K - keep.sum())
    assert dropped > 0 and float(aux["dropped"]) == dropped
    assert np.abs(np.asarray(y)[m] - np.asarray(ref_full)[m]).max() > 1e-3  # dropping really changed the output
    huge_block, *_ = _block(capacity_factor=1e6)
    y_huge, aux_huge = _apply(huge_block)(params, x, mask)
    y_dropless, _ = _apply(_block()[0])(params, x, mask)
    np.testing.assert_allclose(np.asarray(y_huge), np.asarray(y_dropless), rtol=0, atol=1e-6)
    assert float(aux_huge["dropped"]) == 0


def test_bfloat16_compute_stays_close_to_float32():
    block32, params, x, mask = _block()
    block16 = MoEBlock(block32.cfg, RuntimeConfig(dtype="bfloat16", moe_impl="tiled"))
    y32, _ = _apply(block32)(params, x, mask)
    y16, aux16 = _apply(block16)(params, x, mask)
    assert y16.dtype == jnp.bfloat16 and aux16["router_prob_sum"].dtype == jnp.float32
    m = np.asarray(mask)
    scale = np.abs(np.asarray(y32)[m]).max()
    assert np.abs(np.asarray(y16, np.float32)[m] - np.asarray(y32)[m]).max() <= 0.05 * scale


def test_losses_and_metrics_from_sums():
    counts = jnp.array([[4.0, 2.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    probs = jnp.array([[2.0, 1.0, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    aux = {"expert_counts": counts, "router_prob_sum": probs, "num_tokens": jnp.array([4.0, 4.0]),
           "router_z_sum": jnp.array([8.0, 4.0]), "dropped": jnp.array([0.0, 2.0])}
    moe = MoEConfig(num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01, router_z_loss_coef=0.1)
    frac, prob = counts.sum(0) / 8.0, probs.sum(0) / 8.0  # pooled over both layers, like transformers
    lb = 4 * float(jnp.sum(frac * prob))
    assert float(load_balancing_loss(aux, moe)) == pytest.approx(lb)
    assert float(router_z_loss(aux)) == pytest.approx(12.0 / 8.0)
    assert float(weighted_router_loss(aux, moe)) == pytest.approx(0.01 * lb + 0.1 * 1.5)
    m = moe_metrics(aux)
    np.testing.assert_allclose(np.asarray(m["expert_load"][0]), [0.5, 0.25, 0.25, 0.0])
    np.testing.assert_allclose(np.asarray(m["max_load"]), [2.0, 1.0])
    p0 = np.array([0.5, 0.25, 0.125, 0.125])
    np.testing.assert_allclose(np.asarray(m["activation_entropy"]), [-(p0 * np.log(p0)).sum(), np.log(4)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["dropped_fraction"]), [0.0, 0.25])
    assert float(load_balancing_loss({}, moe)) == 0.0
    with pytest.raises(ValueError, match="router_prob_sum"):
        load_balancing_loss({"expert_counts": counts}, moe)


def test_tiled_grouped_matmul_matches_ragged_dot():
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(11, 5)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(4, 5, 6)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(11, 6)), jnp.float32)

    @functools.partial(jax.jit, static_argnums=1)
    def value_and_vjp(gs, impl):
        y, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, gs, impl, tile_rows=4), lhs, rhs)
        return (y, *vjp(ct))

    # group sizes are data, so one compile per impl covers: tile-straddling groups, empty groups, rows past
    # sum(group_sizes), one group spanning several tiles, every row used
    for sizes in ([3, 0, 5, 1], [0, 0, 7, 0], [1, 6, 0, 0], [2, 3, 3, 3]):
        gs = jnp.asarray(sizes, jnp.int32)
        ours, ref = value_and_vjp(gs, "tiled"), value_and_vjp(gs, "ragged_dot")
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        assert np.all(np.asarray(ours[0])[sum(sizes):] == 0)


def test_unsupported_impls_are_clear_errors():
    with pytest.raises(ConfigError, match="moe_impl='bogus'"):
        RuntimeConfig(moe_impl="bogus")
    with pytest.raises(ConfigError, match="capacity_factor"):
        MoEConfig(capacity_factor=0.0)
    with pytest.raises(ValueError, match="'bogus' is not available"):
        grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.array([2, 2]), "bogus")


def test_a3b_preset_parameter_count():
    cfg = get_preset("sailvl2-a3b").llm
    abstract = jax.eval_shape(
        lambda: Qwen3ForCausalLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    )
    assert count_params(abstract) == 30_532_122_624
    experts = abstract["params"]["layers_47"]["mlp"]["experts"]
    assert experts["gate_proj"].value.shape == (128, 2048, 768)
    assert experts["gate_proj"].names == ("exp", "embed_moe", "mlp_moe")
    assert experts["down_proj"].names == ("exp", "mlp_moe", "embed_moe")


def test_block_param_tree_matches_the_converter_layout():
    block, params, x, mask = _block()
    init = jax.eval_shape(block.init, jax.random.PRNGKey(0), x, mask)
    assert jax.tree.map(lambda a: a.shape, nn.unbox(init)) == jax.tree.map(lambda a: a.shape, params)
    assert init["params"]["gate"]["kernel"].names == ("embed", None)
