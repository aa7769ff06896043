"""The DAPO/GSPO policy loss against hand-computed values, its gradients, and data-parallel equivalence."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sail_jax.rl import agg_denom, agg_loss, per_token_loss, policy_loss

DAPO = {"level": "token", "clip_low": 0.2, "clip_high": 0.28}
# One compiled program per configuration is much faster on CPU than op-by-op dispatch.
jit_loss = jax.jit(policy_loss, static_argnames=("level", "clip_low", "clip_high", "agg", "dual_clip"))


def _token_case():
    """Ratios chosen so each branch shows: row 0 (A=+1) clip-high, small ratio unclipped, plain; row 1 (A=-1)
    clip-low, large ratio unclipped, a ratio 4 that a dual clip of 3 bounds, ratio 1; row 2 fully masked (-inf)."""
    ratios = np.array([[1.5, 0.5, 1.1, 1.0], [0.5, 1.5, 4.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
    old = np.full(ratios.shape, -1.0, np.float32)
    logp = (old + np.log(ratios)).astype(np.float32)
    logp[2] = -np.inf  # whatever masked positions hold must not leak into the loss or its gradient
    return jnp.asarray(logp), jnp.asarray(old), jnp.asarray([1.0, -1.0, 2.0]), jnp.asarray(mask)


@pytest.mark.parametrize("agg, dual_clip, expected", [
    ("token-mean", None, (-1.28 - 0.5 - 1.1 + 0.8 + 1.5 + 4.0 + 1.0) / 7),
    ("token-mean", 3.0, (-1.28 - 0.5 - 1.1 + 0.8 + 1.5 + 3.0 + 1.0) / 7),
    ("seq-mean-token-mean", None, ((-1.28 - 0.5 - 1.1) / 3 + (0.8 + 1.5 + 4.0 + 1.0) / 4) / 2),
    ("seq-mean-token-mean", 3.0, ((-1.28 - 0.5 - 1.1) / 3 + (0.8 + 1.5 + 3.0 + 1.0) / 4) / 2),
])
def test_token_level_loss_and_metrics(agg, dual_clip, expected):
    logp, old, adv, mask = _token_case()
    loss, m = jit_loss(logp, old, adv, mask, agg=agg, dual_clip=dual_clip, **DAPO)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_high"], 1 / 7, rtol=1e-6)  # row 0, ratio 1.5 with A > 0
    np.testing.assert_allclose(m["clip_frac_low"], 1 / 7, rtol=1e-6)  # row 1, ratio 0.5 with A < 0
    np.testing.assert_allclose(m["dual_clip_frac"], 0.0 if dual_clip is None else 1 / 7, atol=1e-7)
    kept = [1.5, 0.5, 1.1, 0.5, 1.5, 4.0, 1.0]
    np.testing.assert_allclose(m["ratio_mean"], sum(kept) / 7, rtol=1e-6)
    np.testing.assert_allclose(m["approx_kl"], -np.log(kept).sum() / 7, rtol=1e-5)
    # [B, T] advantages give the same result as [B].
    loss_bt, _ = jit_loss(logp, old, jnp.broadcast_to(adv[:, None], logp.shape), mask, agg=agg,
                             dual_clip=dual_clip, **DAPO)
    np.testing.assert_allclose(loss_bt, loss, rtol=1e-6)


def test_token_level_gradient_is_zero_where_clipped():
    logp, old, adv, mask = _token_case()
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, agg="token-mean", dual_clip=3.0, **DAPO)[0])(logp)
    # d/dlogp of -A·r is -A·r; the clipped (row 0 t0, row 1 t0) and dual-clipped (row 1 t2) tokens give 0.
    expected = np.array([[0.0, -0.5, -1.1, 0.0], [0.0, 1.5, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]) / 7
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_fully_masked_batch_gives_zeros_not_nan(level, agg):
    logp, old, adv, mask = _token_case()
    fn = lambda lp: policy_loss(lp, old, adv, jnp.zeros_like(mask), level=level, clip_low=0.2, clip_high=0.28,
                                agg=agg)
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(logp)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())
    assert np.all(np.asarray(grad) == 0.0)


def _seq_case():
    """GSPO rows: s = 2 with A=+1 (clip-high), s = 0.5 with A=-1 (clip-low), s = 1 over two tokens, fully masked."""
    ratios = np.array([[2.0, 2.0, 7.0], [0.5, 0.5, 0.5], [0.5, 2.0, 9.0], [3.0, 3.0, 3.0]])
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0]], np.float32)
    old = np.full(ratios.shape, -2.0, np.float32)
    return (jnp.asarray(old + np.log(ratios), jnp.float32), jnp.asarray(old), jnp.asarray([1.0, -1.0, 1.0, 1.0]),
            jnp.asarray(mask))


@pytest.mark.parametrize("agg, expected", [
    ("seq-mean-token-mean", (-1.28 + 0.8 - 1.0) / 3),
    ("token-mean", (-1.28 * 2 + 0.8 * 3 - 1.0 * 2) / 7),
])
def test_sequence_level_loss_and_metrics(agg, expected):
    logp, old, adv, mask = _seq_case()
    loss, m = jit_loss(logp, old, adv, mask, level="sequence", clip_low=0.2, clip_high=0.28, agg=agg)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(m["clip_frac_high"], 2 / 7, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_low"], 3 / 7, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], (2 * 2 + 0.5 * 3 + 1 * 2) / 7, rtol=1e-5)
    np.testing.assert_allclose(m["approx_kl"], np.log(2) / 7, rtol=1e-5)


def test_sequence_ratio_is_capped_at_exp_10():
    logp, old, adv, mask = _seq_case()
    loss, m = jit_loss(old + 30.0, old, -adv, mask, level="sequence", clip_low=0.2, clip_high=0.28,
                          agg="seq-mean-token-mean")
    # Every sequence's log ratio is 30, capped to 10; A = -1, +1, -1: unclipped, clipped (1.28), unclipped.
    np.testing.assert_allclose(loss, (np.exp(10.0) - 1.28 + np.exp(10.0)) / 3, rtol=1e-5)
    np.testing.assert_allclose(m["ratio_mean"], np.exp(10.0), rtol=1e-5)


def test_gspo_gradient_equals_sequence_objective_gradient():
    rng = np.random.default_rng(0)
    old = jnp.asarray(rng.normal(-2.0, 0.5, (5, 6)), jnp.float32)
    logp = old + jnp.asarray(rng.normal(0.0, 0.15, (5, 6)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0] * 6, [1, 1, 1, 0, 0, 0]],
                       jnp.float32)
    adv = jnp.asarray([1.0, -0.7, 0.4, 2.0, -1.5], jnp.float32)
    clip = {"clip_low": 0.03, "clip_high": 0.04}

    def sequence_objective(lp):
        n = mask.sum(-1)
        s = jnp.exp(((lp - old) * mask).sum(-1) / jnp.maximum(n, 1))
        per_seq = jnp.minimum(s * adv, jnp.clip(s, 1 - clip["clip_low"], 1 + clip["clip_high"]) * adv)
        return -(per_seq * (n > 0)).sum() / (n > 0).sum()

    fn = lambda lp: policy_loss(lp, old, adv, mask, level="sequence", agg="seq-mean-token-mean", **clip)[0]
    np.testing.assert_allclose(jax.jit(fn)(logp), jax.jit(sequence_objective)(logp), rtol=1e-5)
    s = np.exp(np.asarray(((logp - old) * mask).sum(-1) / np.maximum(mask.sum(-1), 1)))
    clipped = (s > 1.04) & (np.asarray(adv) > 0) | (s < 0.97) & (np.asarray(adv) < 0)
    assert clipped.any() and not clipped[mask.sum(-1) > 0].all()  # both branches are exercised
    np.testing.assert_allclose(jax.jit(jax.grad(fn))(logp), jax.jit(jax.grad(sequence_objective))(logp),
                               rtol=1e-5, atol=1e-8)


def test_bad_arguments_are_rejected():
    logp, old, adv, mask = _token_case()
    with pytest.raises(ValueError, match="dual_clip applies"):
        policy_loss(logp, old, adv, mask, level="sequence", clip_low=0.2, clip_high=0.2, agg="token-mean",
                    dual_clip=3.0)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logp, old, adv, mask, agg="token-mean", dual_clip=1.0, **DAPO)
    with pytest.raises(ValueError, match="agg="):
        policy_loss(logp, old, adv, mask, agg="seq-mean", **DAPO)
    with pytest.raises(ValueError, match="level="):
        policy_loss(logp, old, adv, mask, level="tok", clip_low=0.2, clip_high=0.2, agg="token-mean")


def _dp_batch():
    rng = np.random.default_rng(1)
    old = rng.normal(-2.0, 0.5, (8, 5)).astype(np.float32)
    logp = (old + rng.normal(0.0, 0.3, (8, 5))).astype(np.float32)
    lengths = np.array([5, 1, 3, 0, 2, 5, 4, 1])  # uneven per device, one empty row
    mask = (np.arange(5)[None] < lengths[:, None]).astype(np.float32)
    return logp, old, rng.normal(size=8).astype(np.float32), mask


@pytest.mark.parametrize("level, agg", [("token", "token-mean"), ("sequence", "seq-mean-token-mean")])
def test_batch_sharded_loss_equals_single_device(level, agg):
    """Sharding the batch over 8 devices keeps the normaliser global (not a mean of per-device means)."""
    logp, old, adv, mask = _dp_batch()
    fn = jax.jit(partial(policy_loss, level=level, clip_low=0.2, clip_high=0.28, agg=agg))
    ref_loss, ref_metrics = fn(logp, old, adv, mask)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rows = NamedSharding(mesh, P("data"))
    sharded = [jax.device_put(x, rows) for x in (logp, old, adv, mask)]
    loss, metrics = fn(*sharded)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-7)  # summation order differs
    for k in ref_metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-7)
    grad = jax.jit(jax.grad(lambda *a: fn(*a)[0]))
    np.testing.assert_allclose(grad(*sharded), grad(logp, old, adv, mask), rtol=1e-5, atol=1e-8)
    # The per-device means the loss must NOT be differ here, so the test can tell them apart.
    per_device = [fn(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1])[0] for i in range(8)]
    assert abs(float(np.mean(per_device)) - float(ref_loss)) > 1e-3


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_shard_map_parts_with_global_denominator_sum_to_loss(agg):
    """Each shard (or micro-batch) reduces with the mini-batch's `agg_denom`; the psum is the mini-batch loss."""
    logp, old, adv, mask = _dp_batch()
    kw = {"level": "token", "clip_low": 0.2, "clip_high": 0.28}
    ref, _ = policy_loss(logp, old, adv, mask, agg=agg, **kw)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    denom = agg_denom(mask, agg)

    def part(lp, o, a, m, d):
        loss_mat, _ = per_token_loss(lp, o, a, m, **kw)
        return jax.lax.psum(agg_loss(loss_mat, m, agg=agg, denom=d), "data")

    sharded = jax.jit(jax.shard_map(part, mesh=mesh, in_specs=(P("data"),) * 4 + (P(),), out_specs=P()))
    np.testing.assert_allclose(sharded(logp, old, adv, mask, denom), ref, rtol=1e-5, atol=1e-7)
    micro = sum(agg_loss(per_token_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], **kw)[0],
                         mask[i:i + 2], agg=agg, denom=denom) for i in range(0, 8, 2))
    np.testing.assert_allclose(micro, ref, rtol=1e-5, atol=1e-7)
