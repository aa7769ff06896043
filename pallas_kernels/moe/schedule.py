"""Tilings and the (tiny, XLA-side) schedules that drive the grouped-matmul kernels.

Rows of lhs are grouped contiguously: group g owns rows [start_g, end_g). An m-tile of `tm` rows may straddle
several groups, and a group may span several m-tiles. The TPU kernels walk a flat list of "visits" (group, m-tile),
in row order, so an output tile stays resident in VMEM across the consecutive visits that share it; the GPU kernels
instead give each program one output tile and loop over the groups (or m-tiles) it touches.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels._backend import next_pow2, round_up


@dataclasses.dataclass(frozen=True)
class Tiling:
    tm: int
    tk: int
    tn: int


def choose_tiling(backend: str, m: int, k: int, n: int, tiling: tuple[int, int, int] | None) -> Tiling:
    """Defaults per backend, capped by the (padded) problem size, validated against the backend's rules.

    Mosaic: tm a multiple of 8, tk/tn multiples of 128. Triton: powers of two >= 16.
    """
    if backend == "mosaic":
        tm, tk, tn = tiling or (min(256, round_up(m, 8)), min(512, round_up(k, 128)), min(256, round_up(n, 128)))
        if tm % 8 or tk % 128 or tn % 128:
            raise ValueError(f"mosaic gmm tiling (tm, tk, tn)={(tm, tk, tn)}: need tm % 8 == 0, tk, tn % 128 == 0")
    else:
        cap = lambda d, t: min(t, max(16, next_pow2(d)))
        tm, tk, tn = tiling or (cap(m, 64), cap(k, 64), cap(n, 64))
        if any(t < 16 or t & (t - 1) for t in (tm, tk, tn)):
            raise ValueError(f"triton gmm tiling (tm, tk, tn)={(tm, tk, tn)}: need powers of two >= 16")
    return Tiling(tm, tk, tn)


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """[start, end) row range of each group, clipped to the m rows that exist."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


class Visits(NamedTuple):
    """A static-length list of (group, m-tile) visits in row order; entries past `count` repeat the last one."""

    group: jax.Array  # [S] int32
    tile: jax.Array  # [S] int32
    count: jax.Array  # [1] int32


def visits(starts: jax.Array, ends: jax.Array, tm: int, num_tiles: int, num_visits: int,
           visit_empty: bool) -> Visits:
    """Enumerate the m-tiles each range touches; empty ranges get one visit iff `visit_empty`."""
    size = ends - starts
    first = jnp.minimum(starts // tm, num_tiles - 1)
    span = jnp.where(size > 0, (jnp.maximum(ends, 1) - 1) // tm - first + 1, 1 if visit_empty else 0)
    cum = jnp.cumsum(span)
    s = jnp.arange(num_visits, dtype=jnp.int32)
    total = cum[-1]
    s = jnp.minimum(s, total - 1)  # padding visits repeat the last real one
    group = jnp.searchsorted(cum, s, side="right").astype(jnp.int32)
    tile = first[group] + s - (cum[group] - span[group])
    return Visits(group, tile.astype(jnp.int32), total.reshape(1).astype(jnp.int32))


def tile_group_range(starts: jax.Array, ends: jax.Array, tm: int, num_tiles: int) -> tuple[jax.Array, jax.Array]:
    """For each m-tile, the first and last group whose rows intersect it (last < first: none)."""
    t0 = jnp.arange(num_tiles, dtype=jnp.int32) * tm
    lo = jnp.searchsorted(ends, t0, side="right").astype(jnp.int32)  # first group ending after the tile start
    hi = (jnp.searchsorted(starts, t0 + tm, side="left") - 1).astype(jnp.int32)  # last group starting before its end
    return lo, hi  # a tile past every row gets lo = G > hi; empty groups inside [lo, hi] are masked to nothing
