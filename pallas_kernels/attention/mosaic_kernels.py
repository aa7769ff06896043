"""TPU (Pallas-Mosaic) kernel bodies for packed attention, on a head-major [B, H, T, D] layout.

The kv (or, for dK/dV, the q) block axis is the innermost, sequential grid axis; accumulators live in VMEM scratch.
Block metadata is scalar-prefetched into SMEM: index maps clamp the streamed block index into the visible range,
so skipped steps re-use the resident block (no DMA), and `pl.when` skips their compute. Tiling rules: sequence
blocks are multiples of 128; segment ids travel as [B, T, 1] columns and [B, 1, T] rows, lse/di as [B, H, 1, T]
rows, so every block's last two dims are (multiple of 8, multiple of 128) or full.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._backend import Target, dot
from pallas_kernels.attention import tiles
from pallas_kernels.attention.blocks import BlockMeta, Blocks, block_visible

_LANES = 128


def _clamp(n, lo_ref, hi_ref, row):
    """Block index n clamped into [lo, hi] of metadata row `row` (hi < lo means none: stay on lo)."""
    lo = lo_ref[row]
    return jnp.minimum(jnp.maximum(n, lo), jnp.maximum(hi_ref[row], lo))


def _live(n, lo_ref, hi_ref, row, q_min, q_max, k_min, k_max, qi, kj, i, j, blocks: Blocks, causal: bool):
    """Whether grid step (q block i, kv block j) has work: inside the visible range and passing the block test."""
    vis = block_visible(q_min[qi], q_max[qi], k_min[kj], k_max[kj], i, j, blocks.block_q, blocks.block_k, causal)
    return (n >= lo_ref[row]) & (n <= hi_ref[row]) & vis


def _fwd_kernel(q_min, q_max, k_min, k_max, kv_lo, kv_hi, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, blocks: Blocks, causal: bool, scale: float, nq: int, nk: int):
    bq, bk = blocks.block_q, blocks.block_k
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    qi, kj = b * nq + i, b * nk + j

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, tiles.NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(_live(j, kv_lo, kv_hi, qi, q_min, q_max, k_min, k_max, qi, kj, i, j, blocks, causal))
    def _step():
        q_pos = tiles.positions(i * bq, (bq, bk), 0) if causal else None
        k_pos = tiles.positions(j * bk, (bq, bk), 1) if causal else None
        mask = tiles.visible(qseg_ref[...], kseg_ref[...], q_pos, k_pos)
        m, denom, acc = tiles.softmax_step(q_ref[...], k_ref[...], v_ref[...], mask, m_sc[:, :1], l_sc[:, :1],
                                       acc_sc[...], scale)
        m_sc[...] = jnp.broadcast_to(m, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(denom, l_sc.shape)
        acc_sc[...] = acc

    @pl.when(j == nk - 1)
    def _finish():
        o_ref[...] = tiles.normalize(l_sc[:, :1], acc_sc[...], o_ref.dtype)
        lse_ref[...] = tiles.logsumexp(m_sc[...], l_sc[...]).T[:1, :]  # lane-replicated column -> row


def _prefetch(meta: BlockMeta, *names: str) -> list[jax.Array]:
    return [getattr(meta, n).reshape(-1) for n in names]


def _to_heads(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, 1, 2)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, meta: BlockMeta, *, blocks: Blocks,
            causal: bool, scale: float, target: Target) -> tuple[jax.Array, jax.Array]:
    """q [B,Tp,Hq,D], k/v [B,Tp,Hkv,D], seg [B,Tp] -> (o [B,Tp,Hq,D], lse [B,Tp,Hq] f32)."""
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    nq, nk = t // bq, t // bk
    q, k, v = _to_heads(q), _to_heads(k), _to_heads(v)

    def kv(b, h, i, j, *m):
        return _clamp(j, m[4], m[5], b * nq + i)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6,
        grid=(b, hq, nq, nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *m: (b, h, i, 0)),
            pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, *m: (b, jax.lax.div(h, g), kv(b, h, i, j, *m), 0)),
            pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, *m: (b, jax.lax.div(h, g), kv(b, h, i, j, *m), 0)),
            pl.BlockSpec((None, bq, 1), lambda b, h, i, j, *m: (b, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, h, i, j, *m: (b, 0, kv(b, h, i, j, *m))),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *m: (b, h, i, 0)),
            pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *m: (b, h, 0, i)),
        ],
        scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32), pltpu.VMEM((bq, _LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
    )
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, blocks=blocks, causal=causal, scale=scale, nq=nq, nk=nk),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, 1, t), jnp.float32)],
        compiler_params=target.compiler_params(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=target.interpret_arg(),
        name="packed_attention_fwd",
    )(*_prefetch(meta, "q_min", "q_max", "k_min", "k_max", "kv_lo", "kv_hi"), q, k, v, seg[:, :, None],
      seg[:, None, :])
    return _to_heads(o), jnp.swapaxes(lse[:, :, 0, :], 1, 2)


def _dq_kernel(q_min, q_max, k_min, k_max, kv_lo, kv_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref,
               kseg_ref, dq_ref, dq_sc, *, blocks: Blocks, causal: bool, scale: float, nq: int, nk: int):
    bq, bk = blocks.block_q, blocks.block_k
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    qi, kj = b * nq + i, b * nk + j

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(_live(j, kv_lo, kv_hi, qi, q_min, q_max, k_min, k_max, qi, kj, i, j, blocks, causal))
    def _step():
        q_pos = tiles.positions(i * bq, (bk, bq), 1) if causal else None
        k_pos = tiles.positions(j * bk, (bk, bq), 0) if causal else None
        mask_t = tiles.visible(qseg_ref[...], kseg_ref[...], q_pos, k_pos)
        k = k_ref[...]
        _, ds_t = tiles.backward_tile(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], di_ref[...], mask_t,
                                      scale)
        dq_sc[...] += dot(ds_t.T.astype(k.dtype), k)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_min, q_max, k_min, k_max, q_lo, q_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref,
                kseg_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, blocks: Blocks, causal: bool, scale: float, nq: int,
                nk: int, group: int):
    bq, bk = blocks.block_q, blocks.block_k
    b, j, h, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    qi, kj = b * nq + i, b * nk + j

    @pl.when((h == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(_live(i, q_lo, q_hi, kj, q_min, q_max, k_min, k_max, qi, kj, i, j, blocks, causal))
    def _step():
        q_pos = tiles.positions(i * bq, (bk, bq), 1) if causal else None
        k_pos = tiles.positions(j * bk, (bk, bq), 0) if causal else None
        mask_t = tiles.visible(qseg_ref[...], kseg_ref[...], q_pos, k_pos)
        q, do = q_ref[...], do_ref[...]
        p_t, ds_t = tiles.backward_tile(q, k_ref[...], v_ref[...], do, lse_ref[...], di_ref[...], mask_t, scale)
        dk_sc[...] += dot(ds_t.astype(q.dtype), q)
        dv_sc[...] += dot(p_t.astype(do.dtype), do)

    @pl.when((h == group - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, do: jax.Array, lse: jax.Array,
             di: jax.Array, meta: BlockMeta, *, blocks: Blocks, causal: bool, scale: float,
             target: Target) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients for `forward`; lse (finite) and di are [B,Tp,Hq] f32. Returns dq, dk, dv."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    bq, bk = blocks.block_q, blocks.block_k
    nq, nk = t // bq, t // bk
    q, k, v, do = _to_heads(q), _to_heads(k), _to_heads(v), _to_heads(do)
    lse, di = _to_heads(lse)[:, :, None, :], _to_heads(di)[:, :, None, :]  # [B, Hq, 1, Tp] rows
    seg_col, seg_row = seg[:, :, None], seg[:, None, :]
    common = dict(blocks=blocks, causal=causal, scale=scale, nq=nq, nk=nk)
    interpret = target.interpret_arg()

    def kv(b, h, i, j, *m):
        return _clamp(j, m[4], m[5], b * nq + i)

    q_blk = pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *m: (b, h, i, 0))
    kv_blk = pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, *m: (b, jax.lax.div(h, g), kv(b, h, i, j, *m), 0))
    row_blk = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *m: (b, h, 0, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(b, hq, nq, nk),
            in_specs=[q_blk, kv_blk, kv_blk, q_blk, row_blk, row_blk,
                      pl.BlockSpec((None, 1, bq), lambda b, h, i, j, *m: (b, 0, i)),
                      pl.BlockSpec((None, bk, 1), lambda b, h, i, j, *m: (b, kv(b, h, i, j, *m), 0))],
            out_specs=q_blk,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=target.compiler_params(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="packed_attention_dq",
    )(*_prefetch(meta, "q_min", "q_max", "k_min", "k_max", "kv_lo", "kv_hi"), q, k, v, do, lse, di, seg_row,
      seg_col)

    def qb(b, h, j, gi, i, *m):
        return _clamp(i, m[4], m[5], b * nk + j)

    grp_blk = pl.BlockSpec((None, None, bq, d), lambda b, h, j, gi, i, *m: (b, h * g + gi, qb(b, h, j, gi, i, *m), 0))
    grp_row = pl.BlockSpec((None, None, 1, bq), lambda b, h, j, gi, i, *m: (b, h * g + gi, 0, qb(b, h, j, gi, i, *m)))
    own_blk = pl.BlockSpec((None, None, bk, d), lambda b, h, j, gi, i, *m: (b, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, group=g, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(b, hkv, nk, g, nq),
            in_specs=[grp_blk, own_blk, own_blk, grp_blk, grp_row, grp_row,
                      pl.BlockSpec((None, 1, bq), lambda b, h, j, gi, i, *m: (b, 0, qb(b, h, j, gi, i, *m))),
                      pl.BlockSpec((None, bk, 1), lambda b, h, j, gi, i, *m: (b, j, 0))],
            out_specs=[own_blk, own_blk],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=target.compiler_params(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="packed_attention_dkv",
    )(*_prefetch(meta, "q_min", "q_max", "k_min", "k_max", "q_lo", "q_hi"), q, k, v, do, lse, di, seg_row, seg_col)
    return _to_heads(dq), _to_heads(dk), _to_heads(dv)
