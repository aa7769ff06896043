"""In-kernel tile math shared by the Mosaic and Triton kernel bodies (pure jnp on loaded tiles).

Forward tiles are [block_q, block_k] (queries on rows); backward tiles are transposed, [block_k, block_q], so the
per-query statistics (lse, di) are row vectors that broadcast over keys and dK/dV are plain A @ B products.
Masked logits use a large finite negative (not -inf) so fully masked tiles never compute inf - inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._backend import dot

NEG = -1e30


def positions(start: jax.Array | int, shape: tuple[int, int], axis: int) -> jax.Array:
    """Sequence positions of a tile along `axis`, broadcast to the full tile shape."""
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def visible(q_seg: jax.Array, k_seg: jax.Array, q_pos: jax.Array | None, k_pos: jax.Array | None) -> jax.Array:
    """Same non-zero segment, and key not after query when positions are given (causal)."""
    mask = (q_seg == k_seg) & (k_seg != 0)
    if q_pos is not None:
        mask = mask & (k_pos <= q_pos)
    return mask


def softmax_step(q, k, v, mask, m_prev, l_prev, acc_prev, scale: float):
    """One kv tile of online softmax. m (running max) / l (denominator): [bq, 1] f32, acc: [bq, D] f32."""
    s = jnp.where(mask, dot(q, k, trans_b=True) * scale, NEG)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc_prev + dot(p.astype(v.dtype), v)
    return m_new, l_new, acc_new


def normalize(denom, acc, dtype):
    """acc / denom; rows that saw no key (denom == 0) give 0. (NaN inputs stay NaN: `!=`, not `>`.)"""
    seen = denom != 0.0
    return jnp.where(seen, acc / jnp.where(seen, denom, 1.0), 0.0).astype(dtype)


def logsumexp(m, denom):
    """m + log(denom); -inf for rows that saw no key."""
    seen = denom != 0.0
    return jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)


def backward_tile(q, k, v, do, lse_row, di_row, mask_t, scale: float):
    """Transposed probabilities and score gradients, both [bk, bq] f32.

    lse_row / di_row are [1, bq] (lse finite: the wrapper maps -inf to 0, those rows are fully masked anyway);
    di = rowsum(dO * O) - dlse, so a cotangent on lse is folded in for free.
    """
    s_t = dot(k, q, trans_b=True) * scale
    p_t = jnp.where(mask_t, jnp.exp(s_t - lse_row), 0.0)
    dp_t = dot(v, do, trans_b=True)
    return p_t, p_t * (dp_t - di_row)
