"""Grouped matmul for the MoE experts: rows sorted by group, one weight matrix per group.

`grouped_matmul(lhs [M,K], rhs [G,K,N], group_sizes [G], impl)` computes, for group g, the rows
`lhs[start_g : start_g + size_g] @ rhs[g]`; rows past `sum(group_sizes)` give zeros (the MoE dispatch parks
padding and dropped assignments there). Every MoE expert matmul goes through this one function so a kernel
can be swapped in by name.

impls:
- "ragged_dot": `jax.lax.ragged_dot`, the reference. Fast where the backend has a native grouped kernel (TPU),
  but XLA:CPU (and, per marin #7012, XLA:GPU) rewrites it into a dense product over all G groups, which costs
  G x the useful FLOPs and a [M, G*K] temporary.
- "tiled": pure-XLA grouped matmul. A loop visits (row tile, group) pairs, megablox-style: a tile that straddles
  a group boundary is visited once per group with the other rows masked, so the work is at most
  (ceil(M/tile) + G - 1) tile matmuls and never touches rows past sum(group_sizes). Its custom VJP computes
  d_lhs with the same loop over the transposed weights and d_rhs by accumulating per-tile lhs^T @ d_out into the
  visited group.
- "pallas": our Pallas grouped-matmul kernel (`pallas_kernels.moe.gmm`, Mosaic on TPU, Triton on GPU,
  interpret mode on CPU) with its own gmm/tgmm backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

GROUPED_MATMUL_IMPLS = ("ragged_dot", "tiled", "pallas")
DEFAULT_TILE_ROWS = 128


def grouped_matmul(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, impl: str, tile_rows: int = DEFAULT_TILE_ROWS
) -> jax.Array:
    """[M,K] x [G,K,N] -> [M,N] with rows grouped by `group_sizes` (see the module docstring)."""
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1] or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(
            f"grouped_matmul shapes: lhs {lhs.shape} must be [M,K], rhs {rhs.shape} [G,K,N], "
            f"group_sizes {group_sizes.shape} [G]"
        )
    group_sizes = group_sizes.astype(jnp.int32)
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)
    if impl == "tiled":
        lhs, rhs = _vary_like(lhs, rhs, group_sizes), _vary_like(rhs, lhs, group_sizes)
        return _tiled_gmm(lhs, rhs, group_sizes, max(1, min(int(tile_rows), lhs.shape[0])))
    if impl == "pallas":
        from pallas_kernels.moe import gmm
        from sail_jax.sharding import target_platform

        # No `_vary_like` here: the dispatch's shard_map runs this impl with check_vma=False (pallas_call outputs
        # carry no varying-axes type, and interpret mode cannot mix varying and invariant operands).
        return gmm(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype, platform=target_platform())
    raise ValueError(f"grouped_matmul impl {impl!r} is not available; implemented: {GROUPED_MATMUL_IMPLS}")


def _visits(group_sizes: jax.Array, num_tiles: int, tile: int) -> tuple[jax.Array, ...]:
    """Static-length schedule of (group, tile, first row, end row) visits; idle visits have an empty row range."""
    g_count = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first_tile = starts // tile
    tiles_per_group = jnp.where(group_sizes > 0, (ends - 1) // tile - first_tile + 1, 0)
    visit_end = jnp.cumsum(tiles_per_group)
    v = jnp.arange(num_tiles + g_count - 1, dtype=jnp.int32)
    g = jnp.searchsorted(visit_end, v, side="right")
    active = g < g_count
    g = jnp.minimum(g, g_count - 1)
    t = jnp.where(active, first_tile[g] + v - (visit_end[g] - tiles_per_group[g]), 0)
    lo = jnp.where(active, starts[g], 0)
    hi = jnp.where(active, ends[g], 0)
    return g, t, lo, hi


def _tile_rows(x: jax.Array, t: jax.Array, lo: jax.Array, hi: jax.Array, tile: int) -> jax.Array:
    """Rows [t*tile, (t+1)*tile) of x with the rows outside [lo, hi) zeroed."""
    r0 = t * tile
    rows = r0 + jnp.arange(tile)
    block = jax.lax.dynamic_slice_in_dim(x, r0, tile)
    return jnp.where(((rows >= lo) & (rows < hi))[:, None], block, jnp.zeros((), x.dtype))


def _vary_like(x: jax.Array, *others: jax.Array) -> jax.Array:
    """x, made to vary over the shard_map axes of `others` too (values unchanged).

    Inside shard_map a scan carry must keep one type, and a custom-VJP cotangent must vary exactly like its
    primal. Adding `full_like(other, 0)` carries each operand's varying axes; JAX differentiates the implicit
    broadcast, so the cotangent of an operand that varied over fewer axes is psum-ed back correctly.
    """
    for o in others:
        x = x + jax.lax.full_like(o, 0, dtype=x.dtype, shape=x.shape)
    return x


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0))) if rows > x.shape[0] else x


def _gmm_loop(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
    m = lhs.shape[0]
    num_tiles = -(-m // tile)
    lhs_p = _pad_rows(lhs, num_tiles * tile)

    def body(out, visit):
        g, t, lo, hi = visit
        y = jnp.dot(_tile_rows(lhs_p, t, lo, hi, tile), rhs[g], preferred_element_type=jnp.float32)
        r0 = t * tile
        cur = jax.lax.dynamic_slice_in_dim(out, r0, tile)
        return jax.lax.dynamic_update_slice_in_dim(out, cur + y.astype(out.dtype), r0, 0), None

    out0 = _vary_like(jnp.zeros((num_tiles * tile, rhs.shape[2]), lhs.dtype), lhs, rhs, group_sizes)
    out, _ = jax.lax.scan(body, out0, _visits(group_sizes, num_tiles, tile))
    return out[:m]


def _gmm_weight_grad(lhs: jax.Array, d_out: jax.Array, group_sizes: jax.Array, tile: int, g_count: int) -> jax.Array:
    """[G,K,N] with group g = lhs_g^T @ d_out_g (accumulated in float32)."""
    m = lhs.shape[0]
    num_tiles = -(-m // tile)
    lhs_p, d_p = _pad_rows(lhs, num_tiles * tile), _pad_rows(d_out, num_tiles * tile)

    def body(acc, visit):
        g, t, lo, hi = visit
        x = _tile_rows(lhs_p, t, lo, hi, tile)
        dy = jax.lax.dynamic_slice_in_dim(d_p, t * tile, tile)
        return acc.at[g].add(jnp.dot(x.T, dy, preferred_element_type=jnp.float32)), None

    acc0 = _vary_like(jnp.zeros((g_count, lhs.shape[1], d_out.shape[1]), jnp.float32), lhs, d_out, group_sizes)
    acc, _ = jax.lax.scan(body, acc0, _visits(group_sizes, num_tiles, tile))
    return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
    return _gmm_loop(lhs, rhs, group_sizes, tile)


def _tiled_gmm_fwd(lhs, rhs, group_sizes, tile):
    return _gmm_loop(lhs, rhs, group_sizes, tile), (lhs, rhs, group_sizes)


def _tiled_gmm_bwd(tile, res, d_out):
    lhs, rhs, group_sizes = res
    d_lhs = _gmm_loop(d_out.astype(lhs.dtype), jnp.swapaxes(rhs, 1, 2), group_sizes, tile)
    d_rhs = _gmm_weight_grad(lhs, d_out.astype(lhs.dtype), group_sizes, tile, rhs.shape[0]).astype(rhs.dtype)
    return d_lhs, d_rhs, None


_tiled_gmm.defvjp(_tiled_gmm_fwd, _tiled_gmm_bwd)
