"""Rotary position embeddings (rotate-half / NeoX layout, as Qwen3 and HF Llama use)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2, in float32 (dims i and i+head_dim/2 share it)."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.float32(theta) ** exponent)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [..., head_dim] in float32 for integer `positions` [...]."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D]; cos/sin [B, T, D] (float32). Rotation in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (x32 * c + rotate_half(x32) * s).astype(x.dtype)
