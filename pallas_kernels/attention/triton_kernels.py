"""GPU (Pallas-Triton) kernel bodies for packed attention, on the native [B, T, H, D] layout.

One program per (batch, head, q block) for the forward and dQ passes, one per (batch, kv head, kv block) for
dK/dV. Each program loops only over the blocks in its visible range (from `BlockMeta`), so masked-out segments and
the causal upper triangle are never loaded. K/V (or Q/dO) refs span the whole sequence and are sliced with pl.ds
inside the loop: Triton refs are pointers, so nothing is copied. GQA: a kv head's refs are shared by its G query
heads (forward/dQ) and the dK/dV program walks the G query heads of its group, accumulating in registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._backend import Target, dot, next_pow2
from pallas_kernels.attention import tiles
from pallas_kernels.attention.blocks import BlockMeta, Blocks


def _pad_head_dim(*xs: jax.Array) -> tuple[int, list[jax.Array]]:
    """Triton tensors must have power-of-two sizes (and tl.dot >= 16): zero-pad D; zeros change no dot product."""
    d = xs[0].shape[-1]
    dp = max(16, next_pow2(d))
    if dp == d:
        return d, list(xs)
    return d, [jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)]) for x in xs]


def _scalar() -> pl.BlockSpec:
    """[B, n] metadata read as one scalar per (batch, head, block) program."""
    return pl.BlockSpec((None, None), lambda b, h, n: (b, n))


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, blocks: Blocks,
                causal: bool, scale: float):
    bq, bk = blocks.block_q, blocks.block_k
    i = pl.program_id(2)
    q = q_ref[...]
    q_seg = qseg_ref[...][:, None]

    def body(j, carry):
        m, denom, acc = carry
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        q_pos = tiles.positions(i * bq, (bq, bk), 0) if causal else None
        k_pos = tiles.positions(j * bk, (bq, bk), 1) if causal else None
        mask = tiles.visible(q_seg, kseg_ref[ks][None, :], q_pos, k_pos)
        return tiles.softmax_step(q, k_ref[ks, :], v_ref[ks, :], mask, m, denom, acc, scale)

    init = (jnp.full((bq, 1), tiles.NEG, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, denom, acc = jax.lax.fori_loop(lo_ref[...], hi_ref[...] + 1, body, init)
    o_ref[...] = tiles.normalize(denom, acc, o_ref.dtype)
    lse_ref[...] = tiles.logsumexp(m, denom).reshape(bq)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, meta: BlockMeta, *, blocks: Blocks,
            causal: bool, scale: float, target: Target) -> tuple[jax.Array, jax.Array]:
    """q [B,Tp,Hq,D], k/v [B,Tp,Hkv,D], seg [B,Tp] -> (o [B,Tp,Hq,D], lse [B,Tp,Hq] f32)."""
    b, t, hq, _ = q.shape
    g = hq // k.shape[2]
    d, (q, k, v) = _pad_head_dim(q, k, v)
    dp = q.shape[-1]
    bq = blocks.block_q
    kernel = functools.partial(_fwd_kernel, blocks=blocks, causal=causal, scale=scale)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, hq, t // bq),
        in_specs=[
            _scalar(), _scalar(),
            pl.BlockSpec((None, bq, None, dp), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, t, None, dp), lambda b, h, i: (b, 0, jax.lax.div(h, g), 0)),
            pl.BlockSpec((None, t, None, dp), lambda b, h, i: (b, 0, jax.lax.div(h, g), 0)),
            pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
            pl.BlockSpec((None, t), lambda b, h, i: (b, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, dp), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.float32)],
        compiler_params=target.compiler_params(num_warps=4 if dp <= 64 else 8, num_stages=2),
        interpret=target.interpret_arg(),
        name="packed_attention_fwd",
    )(meta.kv_lo, meta.kv_hi, q, k, v, seg, seg)
    return o[..., :d], jnp.swapaxes(lse, 1, 2)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kseg_ref, dq_ref, *,
               blocks: Blocks, causal: bool, scale: float):
    bq, bk = blocks.block_q, blocks.block_k
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse_row, di_row = lse_ref[...][None, :], di_ref[...][None, :]
    q_seg = qseg_ref[...][None, :]

    def body(j, dq):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k = k_ref[ks, :]
        q_pos = tiles.positions(i * bq, (bk, bq), 1) if causal else None
        k_pos = tiles.positions(j * bk, (bk, bq), 0) if causal else None
        mask_t = tiles.visible(q_seg, kseg_ref[ks][:, None], q_pos, k_pos)
        _, ds_t = tiles.backward_tile(q, k, v_ref[ks, :], do, lse_row, di_row, mask_t, scale)
        return dq + dot(ds_t.T.astype(k.dtype), k)

    dq = jax.lax.fori_loop(lo_ref[...], hi_ref[...] + 1, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kseg_ref, dk_ref, dv_ref,
                *, blocks: Blocks, causal: bool, scale: float, group: int):
    bq, bk = blocks.block_q, blocks.block_k
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_seg = kseg_ref[...][:, None]
    lo, hi = lo_ref[...], hi_ref[...]

    def head(h, carry):
        def body(i, carry):
            dk, dv = carry
            qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
            q, do = q_ref[qs, h, :], do_ref[qs, h, :]
            q_pos = tiles.positions(i * bq, (bk, bq), 1) if causal else None
            k_pos = tiles.positions(j * bk, (bk, bq), 0) if causal else None
            mask_t = tiles.visible(qseg_ref[qs][None, :], k_seg, q_pos, k_pos)
            p_t, ds_t = tiles.backward_tile(q, k, v, do, lse_ref[h, qs][None, :], di_ref[h, qs][None, :], mask_t,
                                            scale)
            return dk + dot(ds_t.astype(q.dtype), q), dv + dot(p_t.astype(do.dtype), do)

        return jax.lax.fori_loop(lo, hi + 1, body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, do: jax.Array, lse: jax.Array,
             di: jax.Array, meta: BlockMeta, *, blocks: Blocks, causal: bool, scale: float,
             target: Target) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients for `forward`; lse (finite) and di are [B,Tp,Hq] f32. Returns dq, dk, dv."""
    b, t, hq, _ = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    d, (q, k, v, do) = _pad_head_dim(q, k, v, do)
    dp = q.shape[-1]
    bq, bk = blocks.block_q, blocks.block_k
    lse, di = jnp.swapaxes(lse, 1, 2), jnp.swapaxes(di, 1, 2)  # [B, Hq, Tp]
    params = target.compiler_params(num_warps=4 if dp <= 64 else 8, num_stages=2)
    common = dict(blocks=blocks, causal=causal, scale=scale)

    q_blk = pl.BlockSpec((None, bq, None, dp), lambda b, h, i: (b, i, h, 0))
    kv_all = pl.BlockSpec((None, t, None, dp), lambda b, h, i: (b, 0, jax.lax.div(h, g), 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid=(b, hq, t // bq),
        in_specs=[_scalar(), _scalar(), q_blk, kv_all, kv_all, q_blk, row_blk, row_blk,
                  pl.BlockSpec((None, bq), lambda b, h, i: (b, i)), pl.BlockSpec((None, t), lambda b, h, i: (b, 0))],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=target.interpret_arg(),
        name="packed_attention_dq",
    )(meta.kv_lo, meta.kv_hi, q, k, v, do, lse, di, seg, seg)

    group_all = pl.BlockSpec((None, t, g, dp), lambda b, h, j: (b, 0, h, 0))
    kv_blk = pl.BlockSpec((None, bk, None, dp), lambda b, h, j: (b, j, h, 0))
    group_rows = pl.BlockSpec((None, g, t), lambda b, h, j: (b, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, group=g, **common),
        grid=(b, hkv, t // bk),
        in_specs=[_scalar(), _scalar(), group_all, kv_blk, kv_blk, group_all, group_rows,
                  group_rows, pl.BlockSpec((None, t), lambda b, h, j: (b, 0)),
                  pl.BlockSpec((None, bk), lambda b, h, j: (b, j))],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=target.interpret_arg(),
        name="packed_attention_dkv",
    )(meta.q_lo, meta.q_hi, q, k, v, do, lse, di, seg, seg)
    return dq[..., :d], dk[..., :d], dv[..., :d]
