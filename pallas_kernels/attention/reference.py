"""Pure-jnp references for `packed_attention`.

`reference_attention` is the project's own XLA path (`sail_jax.layers.attention.xla_attention`), which is what the
kernel replaces; `dense_reference` is an independent, deliberately naive masked softmax over a repeated-kv [T, T]
score matrix, so the two references also check each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sail_jax.layers.attention import xla_attention


def reference_attention(q, k, v, *, segment_ids, causal: bool = True, sm_scale: float | None = None):
    """(out, lse) from the model's XLA attention, same signature/conventions as `packed_attention`."""
    return xla_attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=causal,
                         scale=sm_scale)


def dense_reference(q, k, v, *, segment_ids, causal: bool = True, sm_scale: float | None = None):
    """Naive masked softmax in float32 with k/v repeated per query head (small shapes only)."""
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    kr = jnp.repeat(k, g, axis=2).astype(jnp.float32)
    vr = jnp.repeat(v, g, axis=2).astype(jnp.float32)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kr, precision="highest") * scale
    seg = segment_ids
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    if causal:
        mask &= jnp.tril(jnp.ones((t, t), bool))[None]
    mask = mask[:, None]
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # -inf for rows with no key
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, vr, precision="highest")
    return out.astype(q.dtype), jnp.swapaxes(lse, 1, 2)
