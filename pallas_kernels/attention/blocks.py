"""Block sizes and the per-block metadata that lets the kernels skip fully masked tiles.

A (q block, kv block) pair can contain a visible pair only if the ranges of non-zero segment ids of the two blocks
overlap and (if causal) the kv block does not start after the q block ends. Testing ranges (min/max per block) is
sound for any segment layout and exact for the usual packing (ids non-decreasing along the row). The kernels walk
only the range [lo, hi] of visible blocks (and test each block inside it), so packed rows cost roughly
sum(len_i^2) instead of T^2.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels._backend import next_pow2, round_up

_BIG = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class Blocks:
    block_q: int
    block_k: int

    @property
    def multiple(self) -> int:
        """Sequence lengths are padded to a multiple of this."""
        return math.lcm(self.block_q, self.block_k)


def choose_blocks(backend: str, t: int, block_q: int | None, block_k: int | None) -> Blocks:
    """Defaults per backend, validated against that backend's tiling rules.

    Mosaic: multiples of 128 (sequence blocks are the lane dimension of the segment-id and lse tiles).
    Triton: powers of two >= 16 (tensor sizes must be powers of two; tl.dot needs >= 16).
    """
    if backend == "mosaic":
        default = min(512, round_up(t, 128))
        bq, bk = block_q or default, block_k or default
        if bq % 128 or bk % 128:
            raise ValueError(f"mosaic attention blocks must be multiples of 128, got ({bq}, {bk})")
    else:
        default = min(64, max(16, next_pow2(t)))
        bq, bk = block_q or default, block_k or default
        for b in (bq, bk):
            if b < 16 or b & (b - 1):
                raise ValueError(f"triton attention blocks must be powers of two >= 16, got ({bq}, {bk})")
    return Blocks(bq, bk)


class BlockMeta(NamedTuple):
    """Per-block segment ranges and visible-block ranges, all int32.

    seg_min/seg_max: [B, n] for q blocks (q_*) and kv blocks (k_*); an all-padding block has min > max.
    kv_lo/kv_hi [B, nq]: first/last kv block a q block may see (hi < lo: none).
    q_lo/q_hi [B, nk]: first/last q block that may see a kv block.
    """

    q_min: jax.Array
    q_max: jax.Array
    k_min: jax.Array
    k_max: jax.Array
    kv_lo: jax.Array
    kv_hi: jax.Array
    q_lo: jax.Array
    q_hi: jax.Array


def _seg_range(seg: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    b, t = seg.shape
    s = seg.reshape(b, t // block, block)
    nz = s != 0
    return jnp.min(jnp.where(nz, s, _BIG), -1), jnp.max(jnp.where(nz, s, 0), -1)


def _first_last(vis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First and last True along the last axis; (0, -1) where there is none."""
    n = vis.shape[-1]
    any_ = jnp.any(vis, -1)
    first = jnp.argmax(vis, -1)
    last = n - 1 - jnp.argmax(vis[..., ::-1], -1)
    return (jnp.where(any_, first, 0).astype(jnp.int32), jnp.where(any_, last, -1).astype(jnp.int32))


def block_meta(seg: jax.Array, blocks: Blocks, causal: bool) -> BlockMeta:
    """Metadata for padded segment ids [B, Tp] (Tp a multiple of both block sizes)."""
    bq, bk = blocks.block_q, blocks.block_k
    q_min, q_max = _seg_range(seg, bq)
    k_min, k_max = _seg_range(seg, bk)
    vis = block_visible(q_min[:, :, None], q_max[:, :, None], k_min[:, None, :], k_max[:, None, :],
                        jnp.arange(q_min.shape[1])[None, :, None], jnp.arange(k_min.shape[1])[None, None, :],
                        bq, bk, causal)
    kv_lo, kv_hi = _first_last(vis)
    q_lo, q_hi = _first_last(jnp.swapaxes(vis, 1, 2))
    return BlockMeta(q_min, q_max, k_min, k_max, kv_lo, kv_hi, q_lo, q_hi)


def block_visible(q_min: jax.Array, q_max: jax.Array, k_min: jax.Array, k_max: jax.Array, i: jax.Array,
                  j: jax.Array, bq: int, bk: int, causal: bool) -> jax.Array:
    """Whether q block i and kv block j can hold a visible (query, key) pair (works on scalars or arrays)."""
    vis = (q_min <= k_max) & (k_min <= q_max)
    if causal:
        vis = vis & (j * bk <= i * bq + (bq - 1))
    return vis
