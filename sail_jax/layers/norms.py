"""Normalisation layers with the upstream numerics (statistics in float32, cast back, then scale)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sail_jax.layers.common import DType, as_dtype


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps)` in float32, cast to the compute dtype, times `scale`."""

    eps: float = 1e-6
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (x.shape[-1],),
            as_dtype(self.param_dtype),
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        dtype = as_dtype(self.dtype)
        return y.astype(dtype) * scale.astype(dtype)


class LayerNorm(nn.Module):
    """Affine LayerNorm with statistics in float32 (torch `nn.LayerNorm` semantics, biased variance)."""

    eps: float = 1e-5
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        pd = as_dtype(self.param_dtype)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)), (d,), pd
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axis_name,)), (d,), pd
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(as_dtype(self.dtype))
