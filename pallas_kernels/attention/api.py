"""`packed_attention`: flash attention over packed rows (segment ids), causal or not, GQA, with a custom VJP.

Padding, validation and backend dispatch live here; the kernel bodies live in `mosaic_kernels` (TPU) and
`triton_kernels` (GPU). Both consume the same per-block metadata and the same tile math, so interpret-mode tests on
CPU exercise exactly the code that ships.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels._backend import Target, check_float_dtype, resolve, round_up
from pallas_kernels.attention import mosaic_kernels, triton_kernels
from pallas_kernels.attention.blocks import Blocks, block_meta, choose_blocks

_KERNELS = {"mosaic": mosaic_kernels, "triton": triton_kernels}


@dataclasses.dataclass(frozen=True)
class _Config:
    blocks: Blocks
    causal: bool
    scale: float
    target: Target

    def kernel_kwargs(self) -> dict:
        return dict(blocks=self.blocks, causal=self.causal, scale=self.scale, target=self.target)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, cfg: _Config) -> tuple[jax.Array, jax.Array]:
    return _attention_fwd(q, k, v, seg, cfg)[0]


def _attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, cfg: _Config):
    meta = block_meta(seg, cfg.blocks, cfg.causal)
    o, lse = _KERNELS[cfg.target.backend].forward(q, k, v, seg, meta, **cfg.kernel_kwargs())
    return (o, lse), (q, k, v, seg, o, lse)


def _attention_bwd(cfg: _Config, res: tuple, cotangents: tuple[jax.Array, jax.Array]):
    q, k, v, seg, o, lse = res
    do, dlse = cotangents
    # d lse_i / d s_ij = p_ij, so a cotangent on lse folds into di (the FA2 rowsum term).
    di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    finite = jnp.isfinite(lse)
    di = di - jnp.where(finite, dlse, 0.0)
    meta = block_meta(seg, cfg.blocks, cfg.causal)
    dq, dk, dv = _KERNELS[cfg.target.backend].backward(
        q, k, v, seg, do.astype(q.dtype), jnp.where(finite, lse, 0.0), di, meta, **cfg.kernel_kwargs()
    )
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _validate(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"k/v {k.shape} do not match q {q.shape} in batch, length or head_dim (self-attention)")
    if hq % k.shape[2]:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {k.shape[2]}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float_dtype(name, x)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids shape {segment_ids.shape} != (batch, length) {(b, t)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must be integers, got {segment_ids.dtype}")


def packed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    causal: bool = True,
    sm_scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Fused attention over packed rows.

    q [B,T,Hq,D], k/v [B,T,Hkv,D] (Hq a multiple of Hkv; k/v never repeated), segment_ids [B,T] (0 = padding).
    A query sees a key iff both have the same non-zero segment id and, if `causal`, key index <= query index.
    Returns (out [B,T,Hq,D] in q.dtype, lse [B,T,Hq] float32); rows with no visible key give 0 and -inf.
    Differentiable in q, k, v (and through lse). `backend`/`interpret`/`platform` (where the code will run, None:
    `jax.default_backend()`): see `pallas_kernels._backend.resolve`.
    """
    _validate(q, k, v, segment_ids)
    target = resolve(backend, interpret, platform)
    t = q.shape[1]
    blocks = choose_blocks(target.backend, t, block_q, block_k)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    cfg = _Config(blocks, bool(causal), scale, target)
    pad = round_up(t, blocks.multiple) - t
    seg = segment_ids.astype(jnp.int32)
    if pad:
        pad_t = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, seg = pad_t(q), pad_t(k), pad_t(v), pad_t(seg)  # padded rows are segment 0: never visible
    out, lse = _attention(q, k, v, seg, cfg)
    return out[:, :t], lse[:, :t]
