"""Pure-jnp references for the MoE kernels: `jax.lax.ragged_dot` and softmax/top-k/argsort/bincount routing."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_gmm(lhs, rhs, group_sizes, *, preferred_element_type=None):
    """What `gmm` must equal (and be differentiated like)."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type,
                              precision=jax.lax.Precision.HIGHEST)


def reference_tgmm(lhs, dout, group_sizes):
    """What gmm's weight gradient (tgmm) must equal: per-group lhs^T @ dout via a masked einsum over all groups
    (independent of ragged_dot's own VJP)."""
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows = jnp.arange(lhs.shape[0])
    member = (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])  # [G, M]
    return jnp.einsum("gm,mk,mn->gkn", member.astype(jnp.float32), lhs.astype(jnp.float32),
                      dout.astype(jnp.float32), precision="highest")


def reference_route(router_logits, k: int, *, norm_topk_prob: bool):
    """(weights, expert_ids, group_sizes, sort_indices) the way a plain-jnp MoE layer computes them."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    flat = ids.reshape(-1)
    sort_indices = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=router_logits.shape[1]).astype(jnp.int32)
    return weights, ids.astype(jnp.int32), group_sizes, sort_indices
