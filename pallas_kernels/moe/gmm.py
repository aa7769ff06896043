"""Grouped matmul: `gmm`, a differentiable drop-in for `jax.lax.ragged_dot` (tgmm kernels: its weight gradient).

gmm(lhs [M,K], rhs [G,K,N], group_sizes [G]) -> [M,N]: rows of lhs are grouped contiguously, group g multiplies
rhs[g]; rows past sum(group_sizes) give 0. Gradients: dlhs = gmm(dout, rhs^T) (the kernel reads rhs transposed, no
copy), drhs = tgmm(lhs, dout). Operands are zero-padded to the tiling here; the kernels never see ragged edges.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels._backend import Target, check_float_dtype, resolve, round_up
from pallas_kernels.moe import mosaic_gmm, triton_gmm
from pallas_kernels.moe.schedule import Tiling, choose_tiling, group_bounds, tile_group_range, visits


def _pad2(x: jax.Array, rows: int, cols: int) -> jax.Array:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, rows - x.shape[-2]), (0, cols - x.shape[-1])])


def _gmm_padded(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool, out_dtype: Any,
                tiling: Tiling, target: Target) -> jax.Array:
    """Un-padded in, un-padded out; rhs is [G,K,N] or, with transpose_rhs, [G,N,K]."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    mp, kp, np_ = round_up(m, tiling.tm), round_up(k, tiling.tk), round_up(n, tiling.tn)
    lhs_p = _pad2(lhs, mp, kp)
    rhs_p = _pad2(rhs, np_, kp) if transpose_rhs else _pad2(rhs, kp, np_)
    starts, ends = group_bounds(group_sizes, m)
    num_tiles = mp // tiling.tm
    if target.backend == "mosaic":
        tail_starts = jnp.concatenate([starts, ends[-1:]])
        tail_ends = jnp.concatenate([ends, jnp.full((1,), mp, jnp.int32)])
        vis = visits(tail_starts, tail_ends, tiling.tm, num_tiles, num_tiles + rhs.shape[0], visit_empty=False)
        out = mosaic_gmm.gmm(lhs_p, rhs_p, starts, ends, vis, tiling=tiling, transpose_rhs=transpose_rhs,
                             out_dtype=out_dtype, target=target)
    else:
        lo, hi = tile_group_range(starts, ends, tiling.tm, num_tiles)
        out = triton_gmm.gmm(lhs_p, rhs_p, starts, ends, lo, hi, tiling=tiling, transpose_rhs=transpose_rhs,
                             out_dtype=out_dtype, target=target)
    return out[:m, :n]


def _tgmm_padded(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, num_groups: int, out_dtype: Any,
                 tiling: Tiling, target: Target) -> jax.Array:
    m, k = lhs.shape
    n = dout.shape[1]
    mp, kp, np_ = round_up(m, tiling.tm), round_up(k, tiling.tk), round_up(n, tiling.tn)
    lhs_p, dout_p = _pad2(lhs, mp, kp), _pad2(dout, mp, np_)
    starts, ends = group_bounds(group_sizes, m)
    if target.backend == "mosaic":
        num_tiles = mp // tiling.tm
        vis = visits(starts, ends, tiling.tm, num_tiles, num_tiles + num_groups - 1, visit_empty=True)
        out = mosaic_gmm.tgmm(lhs_p, dout_p, starts, ends, vis, num_groups=num_groups, tiling=tiling,
                              out_dtype=out_dtype, target=target)
    else:
        out = triton_gmm.tgmm(lhs_p, dout_p, starts, ends, num_groups=num_groups, tiling=tiling,
                              out_dtype=out_dtype, target=target)
    return out[:, :k, :n]


@dataclasses.dataclass(frozen=True)
class _Config:
    out_dtype: Any
    tiling: Tiling
    target: Target


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, cfg: _Config):
    return _gmm_padded(lhs, rhs, group_sizes, transpose_rhs=False, out_dtype=cfg.out_dtype, tiling=cfg.tiling,
                       target=cfg.target)


def _gmm_fwd(lhs, rhs, group_sizes, cfg: _Config):
    return _gmm(lhs, rhs, group_sizes, cfg), (lhs, rhs, group_sizes)


def _gmm_bwd(cfg: _Config, res, dout):
    lhs, rhs, group_sizes = res
    # dlhs [M,K] = dout [M,N] @ rhs[g]^T: the same kernel with K and N (and their tiles) swapped, reading rhs
    # transposed in place.
    t = cfg.tiling
    dlhs = _gmm_padded(dout, rhs, group_sizes, transpose_rhs=True, out_dtype=lhs.dtype,
                       tiling=Tiling(t.tm, t.tn, t.tk), target=cfg.target)
    drhs = _tgmm_padded(lhs, dout, group_sizes, num_groups=rhs.shape[0], out_dtype=rhs.dtype, tiling=cfg.tiling,
                        target=cfg.target)
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _validate(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"gmm expects lhs [M,K] and rhs [G,K,N]; got {lhs.shape} and {rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"contracting dims differ: lhs {lhs.shape} vs rhs {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes shape {group_sizes.shape} != (num_groups,) = {(rhs.shape[0],)}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(f"group_sizes must be integers, got {group_sizes.dtype}")
    check_float_dtype("lhs", lhs)
    check_float_dtype("rhs", rhs)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type: Any = None,
    tiling: tuple[int, int, int] | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
    platform: str | None = None,
) -> jax.Array:
    """`jax.lax.ragged_dot(lhs, rhs, group_sizes)` as a Pallas kernel, differentiable in lhs and rhs.

    lhs [M,K], rhs [G,K,N], group_sizes [G] int -> [M,N] in `preferred_element_type` (default: the promoted input
    dtype), accumulated in float32. tiling = (tm, tk, tn) overrides the backend default. `backend`/`interpret`/
    `platform` (where the code will run, None: `jax.default_backend()`): see `pallas_kernels._backend.resolve`.
    """
    _validate(lhs, rhs, group_sizes)
    target = resolve(backend, interpret, platform)
    out_dtype = jnp.dtype(preferred_element_type or jnp.promote_types(lhs.dtype, rhs.dtype))
    cfg = _Config(out_dtype, choose_tiling(target.backend, lhs.shape[0], lhs.shape[1], rhs.shape[2], tiling), target)
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), cfg)
