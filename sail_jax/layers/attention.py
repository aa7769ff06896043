"""Attention behind one dispatch (`attention_impl`: "xla" | "pallas").

Packed sequences are expressed with segment ids (0 = padding): a query sees a key only if both belong to the
same non-zero segment and, when causal, the key's index is not after the query's. Indices default to the
array position; the KV-cache path passes cache slot indices instead. Rows with no visible key return zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite: keeps fully-masked rows NaN-free
# Score elements (batch rows x heads x queries x keys) one block of XLA:CPU attention computes: a whole batch's
# scores at once no longer fit the caches, and every elementwise pass then streams them from memory (8 rows of
# 640 tokens ran 5x slower per row than one row; 16 ViT tiles 3x slower per tile than one at a time).
CPU_SCORE_BLOCK = 1 << 22


def attention_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_indices: jax.Array | None,
    kv_indices: jax.Array | None,
    causal: bool,
) -> jax.Array:
    """Boolean [B, Tq, Tk]: same non-zero segment (and key index <= query index when causal)."""
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    if causal:
        mask &= q_indices[:, :, None] >= kv_indices[:, None, :]
    return mask


def _xla_block(q, k, v, q_seg, kv_seg, q_idx, kv_idx, causal, scale):
    """q [B,t,Hkv,G,D] against all keys; returns out [B,t,Hkv,G,D] (q dtype) and lse [B,t,Hkv,G] (f32).

    Heads are moved ahead of time so both products are plain batched matmuls (≈1.7x faster on XLA:CPU than
    contracting in the [B,T,H,D] layout), and the row max is a constant for autodiff (softmax does not depend
    on it), which halves the backward pass.
    """
    qt = jnp.transpose(q, (0, 2, 3, 1, 4))  # [B,Hkv,G,t,D]
    kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [B,Hkv,S,D]
    s = jnp.einsum("bkgtd,bksd->bkgts", qt, kt, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_seg, kv_seg, q_idx, kv_idx, causal)[:, None, None]  # [B,1,1,t,S]
    s = jnp.where(mask, s, _NEG)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgts,bksd->bkgtd", (p / denom).astype(v.dtype), vt, preferred_element_type=jnp.float32)
    visible = jnp.any(mask, axis=-1, keepdims=True)  # [B,1,1,t,1]
    o = jnp.where(visible, o, 0.0)
    lse = jnp.where(visible[..., 0], (m + jnp.log(denom))[..., 0], -jnp.inf)  # [B,Hkv,G,t]
    return jnp.transpose(o, (0, 3, 1, 2, 4)).astype(q.dtype), jnp.transpose(lse, (0, 3, 1, 2))


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_indices: jax.Array | None = None,
    kv_indices: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_chunk: int = 2048,
) -> tuple[jax.Array, jax.Array]:
    """Plain-XLA reference attention with GQA (k/v never repeated).

    q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D] -> (out [B,Tq,Hq,D], lse [B,Tq,Hq] float32). Long query sequences are
    processed `q_chunk` rows at a time so the [Tq, Tk] score matrix never exists whole, in the backward pass
    too: each chunk is rematerialised there instead of keeping every chunk's probabilities for it.
    """
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    if q_indices is None:
        q_indices = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq))
    if kv_indices is None:
        kv_indices = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (b, k.shape[1]))
    rows = _row_block(b, hq * min(tq, q_chunk) * k.shape[1])
    if rows < b:  # blocks of `rows` rows one after another (each then chunked over queries as below)
        split = lambda x: x.reshape(b // rows, rows, *x.shape[1:])
        body = lambda a: xla_attention(*a[:3], q_segment_ids=a[3], kv_segment_ids=a[4], q_indices=a[5],
                                       kv_indices=a[6], causal=causal, scale=scale, q_chunk=q_chunk)
        o, lse = jax.lax.map(jax.checkpoint(body), tuple(map(split, (q, k, v, q_segment_ids, kv_segment_ids,
                                                                      q_indices, kv_indices))))
        return o.reshape(b, tq, hq, d), lse.reshape(b, tq, hq)
    qg = q.reshape(b, tq, hkv, g, d)

    if tq <= q_chunk:
        o, lse = _xla_block(qg, k, v, q_segment_ids, kv_segment_ids, q_indices, kv_indices, causal, scale)
        return o.reshape(b, tq, hq, d), lse.reshape(b, tq, hq)

    n = -(-tq // q_chunk)
    pad = n * q_chunk - tq
    padq = lambda x, val=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=val)
    chunks = lambda x: jnp.moveaxis(x.reshape(b, n, q_chunk, *x.shape[2:]), 1, 0)
    qs, segs, idxs = chunks(padq(qg)), chunks(padq(q_segment_ids)), chunks(padq(q_indices))

    def body(args):
        qc, sc, ic = args
        return _xla_block(qc, k, v, sc, kv_segment_ids, ic, kv_indices, causal, scale)

    o, lse = jax.lax.map(jax.checkpoint(body), (qs, segs, idxs))
    o = jnp.moveaxis(o, 0, 1).reshape(b, n * q_chunk, hq, d)[:, :tq]
    lse = jnp.moveaxis(lse, 0, 1).reshape(b, n * q_chunk, hq)[:, :tq]
    return o, lse


def _row_block(b: int, scores_per_row: int) -> int:
    """Batch rows per attention block: all of them, except on XLA:CPU without a multi-device mesh, where a block
    holds the largest divisor of `b` rows whose scores stay within CPU_SCORE_BLOCK (at least one row). Accelerators
    keep the whole batch in one parallel block, and a sharded batch keeps its layout."""
    from sail_jax.sharding import target_platform

    mesh = jax.sharding.get_abstract_mesh()
    if b * scores_per_row <= CPU_SCORE_BLOCK or target_platform() != "cpu" or (not mesh.empty and mesh.size > 1):
        return b
    limit = max(1, CPU_SCORE_BLOCK // scores_per_row)
    return max(r for r in range(1, min(limit, b) + 1) if b % r == 0)


def _pallas_self_attention(q, k, v, segment_ids, causal: bool, scale: float | None) -> jax.Array:
    """The packed-attention kernel; under a mesh it runs per shard (batch over the data axes, heads over
    `tensor`) inside `jax.shard_map`, since XLA cannot partition a Pallas call and would gather its inputs."""
    from jax.sharding import PartitionSpec as P

    from pallas_kernels.attention import packed_attention
    from sail_jax.sharding import active_mesh_axes, target_platform

    platform = target_platform()  # the mesh's: a CPU host compiling for a TPU mesh gets the Mosaic lowering

    def call(q, k, v, seg):
        return packed_attention(q, k, v, segment_ids=seg, causal=causal, sm_scale=scale, platform=platform)[0]

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return call(q, k, v, segment_ids)
    batch = active_mesh_axes("activation_batch", mesh, q.shape[0]) or None
    heads = active_mesh_axes("activation_kv_heads", mesh, k.shape[2]) or None
    spec = P(batch, None, heads, None)
    # check_vma=False: pallas_call outputs carry no varying-axes annotation; every shard is independent here.
    return jax.shard_map(call, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec, check_vma=False)(
        q, k, v, segment_ids
    )


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    kv_segment_ids: jax.Array | None = None,
    q_indices: jax.Array | None = None,
    kv_indices: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    impl: str = "xla",
    q_chunk: int = 2048,
) -> jax.Array:
    """The single attention entry point used by every model.

    Self-attention over packed rows passes only `segment_ids`; cached decoding passes `kv_segment_ids` and
    slot indices too (always the XLA path: the fused kernel is for full-sequence training / prefill).
    """
    self_attention = kv_segment_ids is None and q_indices is None and kv_indices is None
    if impl == "pallas" and self_attention:
        return _pallas_self_attention(q, k, v, segment_ids, causal, scale)
    if impl not in ("xla", "pallas"):
        raise ValueError(f"attention_impl={impl!r}; expected 'xla' or 'pallas'")
    out, _ = xla_attention(
        q,
        k,
        v,
        q_segment_ids=segment_ids,
        kv_segment_ids=segment_ids if kv_segment_ids is None else kv_segment_ids,
        q_indices=q_indices,
        kv_indices=kv_indices,
        causal=causal,
        scale=scale,
        q_chunk=q_chunk,
    )
    return out
