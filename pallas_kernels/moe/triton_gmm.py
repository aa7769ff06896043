"""GPU (Pallas-Triton) grouped matmul kernels: gmm and tgmm.

gmm: one program per output tile [tm, tn]; it loops over the groups whose rows intersect its m-tile (range from
`schedule.tile_group_range`) and, per group, over K, masking rows of other groups. Tiles past sum(group_sizes) see
no group and store zeros. tgmm: one program per (group, k-tile, n-tile) loops over the m-tiles of its group's rows;
an empty group loops zero times and stores zeros. Operand refs span the whole matrix and are sliced with pl.ds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._backend import Target, dot
from pallas_kernels.moe.schedule import Tiling


def _row_mask(m0, start, end, shape):
    rows = m0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= start) & (rows < end)


def _gmm_kernel(lo_ref, hi_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *, tiling: Tiling, num_k: int,
                transpose_rhs: bool):
    tm, tk = tiling.tm, tiling.tk
    m0 = pl.program_id(0) * tm

    def group_body(g, acc):
        start, end = starts_ref[g], ends_ref[g]

        def k_body(kk, acc):
            ks = pl.ds(pl.multiple_of(kk * tk, tk), tk)
            x = lhs_ref[:, ks]
            x = jnp.where(_row_mask(m0, start, end, x.shape), x, jnp.zeros_like(x))
            w = rhs_ref[g, :, ks] if transpose_rhs else rhs_ref[g, ks, :]
            dtype = jnp.promote_types(x.dtype, w.dtype)
            return acc + dot(x.astype(dtype), w.astype(dtype), trans_b=transpose_rhs)

        return jax.lax.fori_loop(0, num_k, k_body, acc)

    acc = jax.lax.fori_loop(lo_ref[...], hi_ref[...] + 1, group_body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def gmm(lhs: jax.Array, rhs: jax.Array, starts: jax.Array, ends: jax.Array, lo: jax.Array, hi: jax.Array, *,
        tiling: Tiling, transpose_rhs: bool, out_dtype: jnp.dtype, target: Target) -> jax.Array:
    """lhs [Mp,Kp], rhs [G,Kp,Np] (or [G,Np,Kp] if transpose_rhs), padded to the tiling -> [Mp,Np]."""
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    mp, kp = lhs.shape
    num_groups = rhs.shape[0]
    np_ = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if transpose_rhs:
        rhs_spec = pl.BlockSpec((num_groups, tn, kp), lambda i, n: (0, n, 0))
    else:
        rhs_spec = pl.BlockSpec((num_groups, kp, tn), lambda i, n: (0, 0, n))
    full = pl.BlockSpec((num_groups,), lambda i, n: (0,))
    return pl.pallas_call(
        functools.partial(_gmm_kernel, tiling=tiling, num_k=kp // tk, transpose_rhs=transpose_rhs),
        grid=(mp // tm, np_ // tn),
        in_specs=[pl.BlockSpec((None,), lambda i, n: (i,)), pl.BlockSpec((None,), lambda i, n: (i,)), full, full,
                  pl.BlockSpec((tm, kp), lambda i, n: (i, 0)), rhs_spec],
        out_specs=pl.BlockSpec((tm, tn), lambda i, n: (i, n)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=target.compiler_params(num_warps=4, num_stages=2),
        interpret=target.interpret_arg(),
        name="gmm",
    )(lo, hi, starts, ends, lhs, rhs)


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, *, tm: int):
    start, end = starts_ref[...], ends_ref[...]

    def body(mt, acc):
        m0 = pl.multiple_of(mt * tm, tm)
        rows = pl.ds(m0, tm)
        x, y = lhs_ref[rows, :], dout_ref[rows, :]
        dtype = jnp.promote_types(x.dtype, y.dtype)
        x = jnp.where(_row_mask(m0, start, end, x.shape), x, jnp.zeros_like(x)).astype(dtype)
        y = jnp.where(_row_mask(m0, start, end, y.shape), y, jnp.zeros_like(y)).astype(dtype)
        return acc + dot(x.T, y)

    first, stop = start // tm, jnp.where(end > start, (end + tm - 1) // tm, start // tm)
    acc = jax.lax.fori_loop(first, stop, body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs: jax.Array, dout: jax.Array, starts: jax.Array, ends: jax.Array, *, num_groups: int, tiling: Tiling,
         out_dtype: jnp.dtype, target: Target) -> jax.Array:
    """lhs [Mp,Kp], dout [Mp,Np] -> [G,Kp,Np], out[g] = lhs[rows_g].T @ dout[rows_g]."""
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    mp, kp = lhs.shape
    np_ = dout.shape[1]
    scalar = pl.BlockSpec((None,), lambda g, kk, n: (g,))
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        grid=(num_groups, kp // tk, np_ // tn),
        in_specs=[scalar, scalar, pl.BlockSpec((mp, tk), lambda g, kk, n: (0, kk)),
                  pl.BlockSpec((mp, tn), lambda g, kk, n: (0, n))],
        out_specs=pl.BlockSpec((None, tk, tn), lambda g, kk, n: (g, kk, n)),
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
        compiler_params=target.compiler_params(num_warps=4, num_stages=2),
        interpret=target.interpret_arg(),
        name="tgmm",
    )(starts, ends, lhs, dout)
