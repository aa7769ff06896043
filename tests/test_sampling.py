"""The vectorised argmax and the two-stage categorical draw of `inference.sampling` against their definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sail_jax.inference.sampling import argmax, categorical, draw_with


def test_argmax_equals_jnp_argmax_with_ties_nan_and_odd_sizes():
    rng = np.random.default_rng(0)
    for n in (5, 1000, 151936):
        x = rng.normal(size=(6, n)).astype(np.float32)
        x[1, [3, n - 1]] = 50.0  # a tie: the first index wins
        x[2] = -np.inf
        x[3, [n // 2, n - 2]] = np.nan  # a NaN counts as the maximum, the first one wins
        x[4] = 7.0
        x[5, : n // 3] = np.inf
        np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(jnp.asarray(x))), np.argmax(x, -1))


def test_two_stage_draw_partitions_the_unit_square_exactly():
    """Midpoints of a 16 x 16 grid of uniforms: every token's share of the square is exactly its probability (the
    masses are multiples of 1/16, so no midpoint sits on a boundary), and a -inf token is never chosen."""
    v = 1024  # 4 groups (token t is in group t % 4) of 256 members
    weights = np.zeros(v, np.float32)
    weights[[0, 4, 1, 1021, 3]] = [1, 3, 2, 2, 8]  # group masses 4, 4, 0, 8 of 16
    logits = np.where(weights > 0, np.log(np.maximum(weights, 1e-30)), -np.inf).astype(np.float32)
    mid = (np.arange(16) + 0.5) / 16
    u = np.stack(np.meshgrid(mid, mid, indexing="ij"), -1).reshape(-1, 2).astype(np.float32)
    tokens = np.asarray(jax.jit(draw_with)(jnp.broadcast_to(jnp.asarray(logits), (len(u), v)), jnp.asarray(u)))
    np.testing.assert_array_equal(np.bincount(tokens, minlength=v), weights / weights.sum() * len(u))


def test_categorical_frequencies_match_softmax_on_a_padded_vocabulary():
    """1,000 tokens (not a multiple of 16: padded with -inf to 1,024), 20,000 seeded draws."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=1000) * 3, jnp.float32)
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.jit(categorical)(keys, jnp.broadcast_to(logits, (n, 1000))))
    assert draws.max() < 1000
    freq = np.bincount(draws, minlength=1000) / n
    assert np.abs(freq - np.asarray(jax.nn.softmax(logits))).max() < 0.01
    # a row's draw depends on its key and logits only
    again = np.asarray(jax.jit(categorical)(keys[:7], jnp.broadcast_to(logits, (7, 1000))))
    np.testing.assert_array_equal(again, draws[:7])
