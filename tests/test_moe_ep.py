"""Expert parallelism on 8 fake CPU devices: equals the single-device result (values, aux, gradients)."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sail_jax.config import LLMConfig, MoEConfig, RuntimeConfig
from sail_jax.layers import moe_dispatch
from sail_jax.layers.moe import MoEBlock, route
from sail_jax.models.qwen3 import Qwen3ForCausalLM
from sail_jax.sharding import abstract_params, batch_sharding, make_mesh, tree_shardings, use_mesh
from sail_jax.training.moe_loss import load_balancing_loss

E, K, D, I_MOE = 8, 2, 16, 8
RT = RuntimeConfig(moe_impl="tiled")  # one runtime for the block checks, so they share compiled steps


def _cfg(num_experts: int = E, **moe_kw) -> LLMConfig:
    moe = MoEConfig(num_experts=num_experts, num_experts_per_tok=K, moe_intermediate_size=I_MOE, **moe_kw)
    return LLMConfig(vocab_size=128, hidden_size=D, intermediate_size=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, moe=moe)


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(8, 6, D)), jnp.float32)
    mask = jnp.ones((8, 6), bool).at[3, 2:].set(False).at[6, 5:].set(False)
    ct = jnp.asarray(rng.normal(size=(8, 6, D)), jnp.float32)
    params = {"params": {"gate": {"kernel": jnp.asarray(rng.normal(size=(D, E)), jnp.float32)}, "experts": {
        name: jnp.asarray(0.3 * rng.normal(size=shape), jnp.float32)
        for name, shape in (("gate_proj", (E, D, I_MOE)), ("up_proj", (E, D, I_MOE)), ("down_proj", (E, I_MOE, D)))
    }}}
    return params, x, mask, ct


@functools.cache
def _step(cfg: LLMConfig, rt: RuntimeConfig):
    """Jitted (y, aux, d(params), d(x)) of sum(y * ct) + load-balancing loss; cached so cases share compiles."""
    block = MoEBlock(cfg, rt)

    def loss(p, x, mask, ct):
        y, aux = block.apply(p, x, mask)
        return jnp.sum(y * ct) + load_balancing_loss(aux, cfg.moe), (y, aux)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    def run(params, x, mask, ct):
        (_, (y, aux)), grads = grad(params, x, mask, ct)
        return y, aux, grads

    return run


def _on_mesh(fn, cfg: LLMConfig, params, x, mask, mesh, *rest):
    """Shard params by the logical rules and the batch over the batch axes, then call fn under the mesh."""
    abstract = jax.eval_shape(MoEBlock(cfg, RuntimeConfig()).init, jax.random.PRNGKey(0), x, mask)
    with use_mesh(mesh):
        params = jax.device_put(params, tree_shardings(abstract, mesh))
        x, mask, *rest = (jax.device_put(a, batch_sharding(mesh, a.shape)) for a in (x, mask, *rest))
        return params, fn(params, x, mask, *rest)


def _assert_close(a, b, tol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=tol)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name, size):
    """`jax.lax.ragged_all_to_all` semantics built from all_gather, so the ragged path runs on XLA:CPU."""
    me = jax.lax.axis_index(axis_name)
    ops, in_off, sizes, out_off = (jax.lax.all_gather(a, axis_name)
                                   for a in (operand, input_offsets, send_sizes, output_offsets))
    rows = jnp.arange(output.shape[0])
    result = output
    for src in range(size):
        rel = rows - out_off[src, me]
        hit = (rel >= 0) & (rel < sizes[src, me])
        result = jnp.where(hit[:, None], ops[src][jnp.clip(in_off[src, me] + rel, 0, operand.shape[0] - 1)], result)
    return result


@pytest.fixture
def emulated_ragged(monkeypatch):
    monkeypatch.setattr(moe_dispatch, "_ragged_all_to_all_available", lambda: True)
    monkeypatch.setattr(moe_dispatch, "_ragged_all_to_all",
                        functools.partial(_emulated_ragged_all_to_all, size=4))


def _skewed(params, x):
    """Every token's choices are experts 7 and 6, both on the last expert shard: the dropless worst case."""
    params = jax.tree.map(lambda a: a, params)
    params["params"]["gate"]["kernel"] = jnp.zeros((D, E)).at[:, 7].set(1.0).at[:, 6].set(0.5)
    return params, jnp.abs(x)


@pytest.mark.parametrize("a2a", ["padded", "ragged"])
def test_expert_parallel_block_equals_single_device(a2a, request):
    if a2a == "ragged":
        request.getfixturevalue("emulated_ragged")
    cfg, mesh = _cfg(), make_mesh(data=2, expert=4)
    # "auto" is the padded exchange on CPU; the statistics test reuses that compiled step
    ref_step, ep_step = _step(cfg, RT), _step(cfg, RT if a2a == "padded" else RuntimeConfig(moe_impl="tiled",
                                                                                             moe_a2a=a2a))
    params, x, mask, ct = _inputs()
    for routing in ("random", "all_to_last_shard"):
        if routing == "all_to_last_shard":
            params, x = _skewed(params, x)
        sharded, out = _on_mesh(ep_step, cfg, params, x, mask, mesh, ct)
        w = sharded["params"]["experts"]["gate_proj"]
        assert w.sharding.spec[0] == "expert" and w.addressable_shards[0].data.shape == (E // 4, D, I_MOE)
        _assert_close(out, ref_step(params, x, mask, ct))
    counts = np.asarray(out[1]["expert_counts"])
    assert counts[7] == counts[6] == int(mask.sum()) and counts.sum() == 2 * int(mask.sum())


def test_pallas_routing_per_shard_equals_jnp_routing():
    """`route(..., impl="pallas")` under a data x expert mesh runs the routing kernel per batch shard (shard_map,
    interpret mode) and equals the single-device jnp routing: probabilities, weights, ids and the logits' gradient."""
    params, x, _, _ = _inputs(5)
    logits = x @ params["params"]["gate"]["kernel"]  # [8, 6, E]
    dw = jnp.asarray(np.random.default_rng(5).normal(size=(8, 6, K)), jnp.float32)

    def run(impl):
        def loss(z):
            probs, w, ids = route(z, K, True, impl)
            return jnp.sum(w * dw) + jnp.sum(probs[..., 0]), (probs, w, ids)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    mesh = make_mesh(data=2, expert=4)
    with use_mesh(mesh):
        sharded = jax.device_put(logits, batch_sharding(mesh, logits.shape))
        assert "shard_map" in str(jax.make_jaxpr(run("pallas"))(sharded)) and sharded.sharding.spec[0]
        ours = run("pallas")(sharded)
    _assert_close(ours, run("ragged_dot")(logits))


def test_pallas_kernels_per_shard_equal_single_device_jnp():
    """`moe_impl="pallas"` (routing + gmm kernels, interpret mode) under expert parallelism: each kernel runs per
    shard in a shard_map, and values, statistics and gradients (the router's included) equal the jnp block."""
    cfg = _cfg()
    params, x, mask, ct = _inputs(5)
    ours = _step(cfg, RuntimeConfig(moe_impl="pallas"))
    text = str(jax.make_jaxpr(lambda p: MoEBlock(cfg, RuntimeConfig(moe_impl="pallas")).apply(p, x, mask))(params))
    assert "moe_route" in text and text.count("pallas_call") >= 4  # routing, and gmm x 3
    _, out = _on_mesh(ours, cfg, params, x, mask, make_mesh(data=2, expert=4), ct)
    _assert_close(out, _step(cfg, RT)(params, x, mask, ct))


def test_statistics_cover_the_global_batch():
    cfg = _cfg()
    params, x, mask, ct = _inputs(1)
    _, (_, aux, _) = _on_mesh(_step(cfg, RT), cfg, params, x, mask, make_mesh(data=2, expert=4), ct)
    _assert_close(aux, _step(cfg, RT)(params, x, mask, ct)[1])
    # the per-shard alternative (mean of each data shard's own loss) is a different number
    halves = [mask & (jnp.arange(8)[:, None] // 4 == i) for i in (0, 1)]
    per_shard = np.mean([float(load_balancing_loss(_step(cfg, RT)(params, x, h, ct)[1], cfg.moe)) for h in halves])
    assert abs(per_shard - float(load_balancing_loss(aux, cfg.moe))) > 1e-3


def test_tensor_and_fsdp_sharded_experts_equal_single_device():
    cfg = _cfg()
    params, x, mask, ct = _inputs(2)
    step = _step(cfg, RT)
    sharded, out = _on_mesh(step, cfg, params, x, mask, make_mesh(data=2, fsdp=2, tensor=2), ct)
    assert sharded["params"]["experts"]["down_proj"].sharding.spec[1:] == ("tensor", "fsdp")
    _assert_close(out, step(params, x, mask, ct))


def test_capacity_under_expert_parallelism():
    params, x, mask, ct = _inputs(3)
    mesh = make_mesh(data=2, expert=4)

    def forward(cfg):
        return _on_mesh(jax.jit(MoEBlock(cfg, RT).apply), cfg, params, x, mask, mesh)[1]

    y_huge, aux_huge = forward(_cfg(capacity_factor=1e3))
    y_ref, aux_ref, _ = _step(_cfg(), RT)(params, x, mask, ct)
    _assert_close((y_huge, aux_huge), (y_ref, aux_ref))
    y, aux = forward(_cfg(capacity_factor=0.5))
    assert np.isfinite(np.asarray(y)).all()
    # capacity is per shard (6 tokens each): ceil(6*2/8*0.5) = 1 slot per expert, first choices first
    top_idx = np.asarray(jax.lax.top_k(x.reshape(-1, D) @ params["params"]["gate"]["kernel"], K)[1])
    m = np.asarray(mask).reshape(-1)
    kept = 0
    for shard in range(8):
        used = np.zeros(E, int)
        for slot in range(K):
            for t in range(shard * 6, shard * 6 + 6):
                if m[t] and used[top_idx[t, slot]] < 1:
                    used[top_idx[t, slot]] += 1
                    kept += 1
    assert float(aux["dropped"]) == m.sum() * K - kept > 0


def test_model_with_expert_parallelism_equals_single_device():
    cfg = dataclasses.replace(_cfg(), num_layers=1)  # one layer keeps the two model compiles affordable
    lm = Qwen3ForCausalLM(cfg, RuntimeConfig())
    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 8)), jnp.int32)
    seg = jnp.ones((8, 8), jnp.int32).at[5, 6:].set(0)
    mesh = make_mesh(data=2, expert=4)
    # random values for every param (no init compile); norm scales around 1
    boxed = abstract_params(lm, ids)
    single = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray((1.0 if "norm" in jax.tree_util.keystr(path) else 0.0)
                                    + 0.3 * rng.normal(size=a.shape), a.dtype), nn.unbox(boxed))
    params = jax.device_put(single, tree_shardings(boxed, mesh))
    assert params["params"]["layers_0"]["mlp"]["experts"]["up_proj"].sharding.spec[0] == "expert"

    def loss(p, ids, seg):
        out = lm.apply(p, ids, segment_ids=seg)
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        w = (seg[:, 1:] != 0).astype(jnp.float32)
        lb = load_balancing_loss(out.aux, cfg.moe)
        return jnp.sum(nll * w) / jnp.sum(w) + 0.1 * lb, (out.logits, lb)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    ref = step(single, ids, seg)
    with use_mesh(mesh):
        ids_s, seg_s = (jax.device_put(a, batch_sharding(mesh, a.shape)) for a in (ids, seg))
        lowered = step.lower(params, ids_s, seg_s)
        assert "all_to_all" in lowered.as_text()
        out = lowered.compile()(params, ids_s, seg_s)
    _assert_close(out, ref)
    assert float(ref[0][1][1]) > 2.0  # the aux loss is really in the compared value (uniform routing gives k=2)


def test_real_ragged_all_to_all_traces_and_lowers(monkeypatch):
    """XLA:CPU cannot compile ragged_all_to_all, but forward and backward must lower (shapes, vma, transpose)."""
    monkeypatch.setattr(moe_dispatch, "_ragged_all_to_all_available", lambda: True)
    params, x, mask, ct = _inputs()
    block = MoEBlock(_cfg(), RuntimeConfig(moe_a2a="ragged"))

    def loss(p, x):
        y, aux = block.apply(p, x, mask)
        return jnp.sum(y * ct) + load_balancing_loss(aux, block.cfg.moe)

    with use_mesh(make_mesh(data=2, expert=4)):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
    assert text.count("ragged_all_to_all") == 4  # two exchanges forward, their transposes backward


def test_clear_errors_on_cpu_and_bad_expert_split():
    params, x, mask, _ = _inputs()
    block6 = MoEBlock(_cfg(num_experts=6), RuntimeConfig())
    p6 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                      nn.unbox(jax.eval_shape(block6.init, jax.random.PRNGKey(0), x, mask)))
    with use_mesh(make_mesh(data=2, expert=4)):
        with pytest.raises(ValueError, match="moe_a2a='ragged' needs jax.lax.ragged_all_to_all"):
            jax.jit(MoEBlock(_cfg(), RuntimeConfig(moe_a2a="ragged")).apply)(params, x, mask)
        with pytest.raises(ValueError, match="num_experts=6 is not divisible by the expert mesh axis size 4"):
            jax.jit(block6.apply)(p6, x, mask)
