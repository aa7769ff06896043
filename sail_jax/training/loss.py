"""Token cross-entropy that never materialises [tokens, vocab] logits for the whole batch.

With a 151,936-row lm_head, the logits dominate a small model's step. We gather only the positions whose
loss weight is non-zero (up to a static `budget`, so shapes stay fixed under jit) and run lm_head + softmax
over them in chunks (`training/fused_ce.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def select_targets(
    hidden: jax.Array, targets: jax.Array, weights: jax.Array, budget: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Gather the rows with weight != 0: hidden [N',D], targets [N'], weights [N'] and the dropped count.

    `budget` (static) bounds N'; positions beyond it are dropped and counted so callers can fail loudly.
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1)
    w = weights.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    budget = n if budget is None else min(int(budget), n)
    active = w != 0
    (idx,) = jnp.nonzero(active, size=budget, fill_value=0)
    keep = jnp.arange(budget) < jnp.sum(active)
    dropped = jnp.maximum(jnp.sum(active) - budget, 0)
    return h[idx], t[idx], jnp.where(keep, w[idx], 0.0), dropped


def pad_to_chunks(
    hidden: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Zero-pad the rows (weight 0) to a multiple of the chunk, clamped to [1, rows]; returns the chunk used."""
    n = hidden.shape[0]
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    return hidden, targets, weights, chunk


def next_token_targets(
    input_ids: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """targets[t] = ids[t+1], weight = loss_mask[t+1], zero where t+1 starts another packed segment."""
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    w = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(jnp.float32)
    if segment_ids is not None:
        same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                                jnp.zeros_like(segment_ids[:, :1], bool)], axis=1)
        w = w * same * (segment_ids != 0)
    return targets, w
