"""Pure-jnp reference for `packed_attention`: a deliberately naive masked softmax over a repeated-kv [T, T] score
matrix in float32, independent of the kernel's tiling, online softmax and GQA indexing (small shapes only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_attention(q, k, v, *, segment_ids, causal: bool = True, sm_scale: float | None = None):
    """(out, lse) with the same signature and conventions as `packed_attention` (rows with no key: 0, -inf)."""
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
