"""Small shared helpers: dtype names, initialisers, logical-partitioned Dense."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DType = str | jnp.dtype

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(d: DType) -> jnp.dtype:
    """'bfloat16' -> jnp.bfloat16 (configs hold strings so they stay JSON/gin friendly)."""
    if isinstance(d, str):
        if d not in _DTYPES:
            raise ValueError(f"unknown dtype {d!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[d]
    return jnp.dtype(d)


def default_kernel_init(stddev: float = 0.02) -> nn.initializers.Initializer:
    """HF-style N(0, 0.02) for Linear weights (initializer_range)."""
    return nn.initializers.normal(stddev)


class Dense(nn.Module):
    """Linear map contracting the last `n_in` input dims into `features`; kernel [*in_dims, *features].

    Written out (instead of `nn.DenseGeneral`) so the kernel is created at its final shape: the logical
    sharding constraint applied at init then matches its rank on every mesh.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    n_in: int = 1
    use_bias: bool = False
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, feats = self.n_in, tuple(self.features)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(default_kernel_init(self.init_std), self.axes),
            tuple(x.shape[-n_in:]) + feats,
            as_dtype(self.param_dtype),
        )
        dtype = as_dtype(self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[n_in:]),
                feats,
                as_dtype(self.param_dtype),
            )
            y = y + bias.astype(dtype)
        return y


def dense(
    features: int | Sequence[int],
    axes: tuple[str | None, ...],
    *,
    name: str,
    dtype: DType,
    param_dtype: DType,
    in_axis: int | Sequence[int] = -1,
    use_bias: bool = False,
    init_std: float = 0.02,
) -> Dense:
    """Shorthand for `Dense`; `in_axis` (-1 or (-2, -1)) says how many trailing dims are contracted."""
    n_in = 1 if isinstance(in_axis, int) else len(tuple(in_axis))
    feats = (features,) if isinstance(features, int) else tuple(features)
    return Dense(feats, tuple(axes), n_in=n_in, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                 init_std=init_std, name=name)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint on an activation (no-op outside a mesh)."""
    return nn.with_logical_constraint(x, axes)


def remat_module(cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """Wrap a layer class for rematerialisation: "none", "full" (save nothing) or "dots_saveable"."""
    if policy == "none":
        return cls
    if policy not in ("full", "dots_saveable"):
        raise ValueError(f"remat_policy={policy!r}; expected 'none', 'full' or 'dots_saveable'")
    pol = None if policy == "full" else jax.checkpoint_policies.dots_saveable
    return nn.remat(cls, policy=pol, prevent_cse=True)
