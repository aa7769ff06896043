"""TPU (Pallas-Mosaic) grouped matmul kernels: gmm (lhs @ rhs[g] per row group) and tgmm (per-group lhs^T @ dout).

The grid's sequential axis walks the (group, m-tile) visit list from `schedule.visits`, scalar-prefetched into SMEM.
Consecutive visits that share an output tile keep it in a VMEM f32 accumulator: zeroed on the first visit, written
on the last. Rows of a tile outside the visited group are masked to zero before the MXU, so a tile straddling a
group boundary is computed once per group. gmm also visits a tail range (rows past sum(group_sizes)) so those
output rows are written as zeros; tgmm visits every group at least once so empty groups produce zero weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._backend import Target, dot
from pallas_kernels.moe.schedule import Tiling, Visits


def _row_mask(tile, start, end, shape):
    rows = tile * shape[0] + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= start) & (rows < end)


def _gmm_kernel(group, tile, count, starts, ends, lhs_ref, rhs_ref, out_ref, acc, *, num_groups: int,
                transpose_rhs: bool):
    s, kk = pl.program_id(1), pl.program_id(2)
    last_s, last_k = pl.num_programs(1) - 1, pl.num_programs(2) - 1
    t, g = tile[s], group[s]
    first_visit = (s == 0) | (tile[jnp.maximum(s - 1, 0)] != t)
    last_visit = (s == last_s) | (tile[jnp.minimum(s + 1, last_s)] != t)

    @pl.when(first_visit & (kk == 0))
    def _zero():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    @pl.when((g < num_groups) & (s < count[0]))
    def _accumulate():
        x, w = lhs_ref[...], rhs_ref[...]
        dtype = jnp.promote_types(x.dtype, w.dtype)
        # select in f32 (no bf16 VPU on older TPUs), feed the MXU in the input dtype
        x = jnp.where(_row_mask(t, starts[g], ends[g], x.shape), x.astype(jnp.float32), 0.0)
        acc[...] += dot(x.astype(dtype), w.astype(dtype), trans_b=transpose_rhs)

    @pl.when(last_visit & (kk == last_k))
    def _store():
        out_ref[...] = acc[...].astype(out_ref.dtype)


def gmm(lhs: jax.Array, rhs: jax.Array, starts: jax.Array, ends: jax.Array, vis: Visits, *, tiling: Tiling,
        transpose_rhs: bool, out_dtype: jnp.dtype, target: Target) -> jax.Array:
    """lhs [Mp,Kp], rhs [G,Kp,Np] (or [G,Np,Kp] if transpose_rhs), padded to the tiling -> [Mp,Np]."""
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    mp, kp = lhs.shape
    num_groups = rhs.shape[0]
    np_ = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    grp = lambda g: jnp.minimum(g, num_groups - 1)  # the tail visit loads (and ignores) the last group
    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, tn, tk), lambda n, s, kk, g, t, *_: (grp(g[s]), n, kk))
    else:
        rhs_spec = pl.BlockSpec((None, tk, tn), lambda n, s, kk, g, t, *_: (grp(g[s]), kk, n))
    return pl.pallas_call(
        functools.partial(_gmm_kernel, num_groups=num_groups, transpose_rhs=transpose_rhs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(np_ // tn, vis.group.shape[0], kp // tk),
            in_specs=[pl.BlockSpec((tm, tk), lambda n, s, kk, g, t, *_: (t[s], kk)), rhs_spec],
            out_specs=pl.BlockSpec((tm, tn), lambda n, s, kk, g, t, *_: (t[s], n)),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=target.compiler_params(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=target.interpret_arg(),
        name="gmm",
    )(vis.group, vis.tile, vis.count, starts, ends, lhs, rhs)


def _tgmm_kernel(group, tile, count, starts, ends, lhs_ref, dout_ref, out_ref, acc):
    s = pl.program_id(2)
    last_s = pl.num_programs(2) - 1
    t, g = tile[s], group[s]
    first_visit = (s == 0) | (group[jnp.maximum(s - 1, 0)] != g)
    last_visit = (s == last_s) | (group[jnp.minimum(s + 1, last_s)] != g)

    @pl.when(first_visit)
    def _zero():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    @pl.when((s < count[0]) & (ends[g] > starts[g]))
    def _accumulate():
        x, y = lhs_ref[...], dout_ref[...]
        dtype = jnp.promote_types(x.dtype, y.dtype)
        x = jnp.where(_row_mask(t, starts[g], ends[g], x.shape), x.astype(jnp.float32), 0.0)
        y = jnp.where(_row_mask(t, starts[g], ends[g], y.shape), y.astype(jnp.float32), 0.0)
        acc[...] += dot(x.T.astype(dtype), y.astype(dtype))  # transpose in f32: the layout Mosaic handles best

    @pl.when(last_visit)
    def _store():
        out_ref[...] = acc[...].astype(out_ref.dtype)


def tgmm(lhs: jax.Array, dout: jax.Array, starts: jax.Array, ends: jax.Array, vis: Visits, *, num_groups: int,
         tiling: Tiling, out_dtype: jnp.dtype, target: Target) -> jax.Array:
    """lhs [Mp,Kp], dout [Mp,Np] -> [G,Kp,Np], out[g] = lhs[rows_g].T @ dout[rows_g]."""
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    kp, np_ = lhs.shape[1], dout.shape[1]
    return pl.pallas_call(
        _tgmm_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(kp // tk, np_ // tn, vis.group.shape[0]),
            in_specs=[pl.BlockSpec((tm, tk), lambda kk, n, s, g, t, *_: (t[s], kk)),
                      pl.BlockSpec((tm, tn), lambda kk, n, s, g, t, *_: (t[s], n))],
            out_specs=pl.BlockSpec((None, tk, tn), lambda kk, n, s, g, t, *_: (g[s], kk, n)),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
        compiler_params=target.compiler_params(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=target.interpret_arg(),
        name="tgmm",
    )(vis.group, vis.tile, vis.count, starts, ends, lhs, dout)
