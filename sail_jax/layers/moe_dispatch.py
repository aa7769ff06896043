"""Token dispatch for the Qwen3-MoE block: sort by expert, grouped SwiGLU, unsort; optional expert parallelism.

Why sort-and-group: each token needs k of E expert MLPs. Sorting the N*k (token, slot) assignments by expert
turns the experts into three grouped matmuls whose cost scales with N*k rather than N*E, and no token is
dropped. `all_experts_reference` (every token through every expert) is kept only as the numerics and benchmark
baseline.

Padding tokens and assignments over capacity get the sort key E: they sort last, past sum(group_sizes), so the
experts never see them, and they combine to zero.

Under a mesh the dispatch runs in `jax.shard_map`: tokens stay sharded over the batch axes and every shard sorts
only its own assignments. With an `expert` axis of size P > 1 the expert weights are split over it and rows are
exchanged: each source shard's rows for shard j land in slot `source` of j's [P, S] receive buffer, where
S = the sender's assignment count (dropless worst case: all of them may pick one shard) or, with a capacity
factor, the per-destination capacity. The receiver sorts the buffer by local expert, runs its experts and sends
the results back. `ragged_all_to_all` moves only the real rows; the padded `all_to_all` (XLA:CPU has no ragged
collective) moves the whole buffer, so it is P x the traffic and memory. The router and its statistics run
outside the shard_map on the global arrays, so load-balancing statistics always cover the global batch; the one
count made inside (dropped assignments) is psum-ed over the token axes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sail_jax.layers.grouped_matmul import grouped_matmul
from sail_jax.sharding import active_mesh_axes, target_platform

# Module attributes so the tests can run the ragged exchange on XLA:CPU through an emulation.
_ragged_all_to_all = jax.lax.ragged_all_to_all


def _ragged_all_to_all_available() -> bool:
    return target_platform() != "cpu"


def resolve_a2a(a2a: str) -> str:
    """'auto' -> 'ragged' where the backend implements ragged_all_to_all, else 'padded'."""
    if a2a == "auto":
        return "ragged" if _ragged_all_to_all_available() else "padded"
    if a2a == "ragged" and not _ragged_all_to_all_available():
        raise ValueError(
            f"moe_a2a='ragged' needs jax.lax.ragged_all_to_all, which the {target_platform()!r} backend does "
            "not implement; use 'padded' or 'auto'"
        )
    if a2a not in ("ragged", "padded"):
        raise ValueError(f"moe_a2a={a2a!r}; expected 'auto', 'ragged' or 'padded'")
    return a2a


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Per-expert slots for `num_tokens` tokens: ceil(tokens * k / E * factor)."""
    return max(1, math.ceil(num_tokens * top_k / num_experts * factor))


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _inverse_permutation(order: jax.Array) -> jax.Array:
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def expert_keys(top_idx: jax.Array, token_mask: jax.Array, num_experts: int, cap: int | None) -> jax.Array:
    """Sort key [N*k] per (token, slot): its expert, or `num_experts` for padding / over-capacity assignments.

    Capacity goes to first choices before second choices, earlier tokens first (GShard order).
    """
    n, k = top_idx.shape
    key = jnp.where(token_mask[:, None], top_idx, num_experts).astype(jnp.int32)
    if cap is not None:
        slot_major = key.T.reshape(-1)
        order = jnp.argsort(slot_major, stable=True)
        starts = _exclusive_cumsum(jnp.bincount(slot_major, length=num_experts + 1))
        pos = _inverse_permutation(order) - starts[slot_major]
        key = jnp.where(pos.reshape(k, n).T < cap, key, num_experts)
    return key.reshape(-1)


def swiglu_experts(
    rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, impl: str
) -> jax.Array:
    """down(silu(gate(x)) * up(x)) per expert group, all through `grouped_matmul`."""
    gate = grouped_matmul(rows, w_gate, group_sizes, impl)
    up = grouped_matmul(rows, w_up, group_sizes, impl)
    return grouped_matmul(jax.nn.silu(gate) * up, w_down, group_sizes, impl)


def all_experts_reference(
    x: jax.Array, top_idx: jax.Array, top_w: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
) -> jax.Array:
    """Every token through every expert, combined with the routing weights (zero for unselected experts)."""
    combine = jnp.sum(jax.nn.one_hot(top_idx, w_gate.shape[0], dtype=x.dtype) * top_w[..., None], axis=1)
    h = jax.nn.silu(jnp.einsum("nd,edi->eni", x, w_gate)) * jnp.einsum("nd,edi->eni", x, w_up)
    return jnp.einsum("eni,eid,ne->nd", h, w_down, combine)


def _exchange_and_run(
    rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
    ep_axis: str, ep_size: int, per_dest: int, a2a: str, impl: str, tp_axes: tuple[str, ...],
) -> jax.Array:
    """Expert-sorted local rows [A,D] -> their expert outputs [A,D], with experts split over `ep_axis`."""
    p, s = ep_size, per_dest
    a, d = rows.shape
    e_local = w_gate.shape[0]
    me = jax.lax.axis_index(ep_axis)
    send = group_sizes.reshape(p, e_local).sum(1)
    send_off = _exclusive_cumsum(send)
    all_sizes = jax.lax.all_gather(group_sizes, ep_axis)  # [source, E]
    recv_by_expert = jax.lax.dynamic_slice_in_dim(all_sizes, me * e_local, e_local, axis=1)  # [source, E_local]
    recv = recv_by_expert.sum(1)
    if a2a == "ragged":
        buf = _ragged_all_to_all(
            rows, jnp.zeros((p * s, d), rows.dtype), send_off, send, jnp.full((p,), me * s, jnp.int32), recv,
            axis_name=ep_axis,
        )
    else:
        slot = jnp.arange(s, dtype=jnp.int32)
        take = jnp.minimum(send_off[:, None] + slot, a - 1)
        sendbuf = jnp.where((slot < send[:, None])[..., None], rows[take], jnp.zeros((), rows.dtype))
        buf = jax.lax.all_to_all(sendbuf, ep_axis, 0, 0, tiled=True).reshape(p * s, d)
    # Each source's chunk is sorted by expert; empty slots get key e_local and sort last.
    ends = jnp.cumsum(recv_by_expert, axis=1)
    local_key = jax.vmap(lambda e: jnp.searchsorted(e, jnp.arange(s), side="right"))(ends).reshape(-1)
    local_order = jnp.argsort(local_key, stable=True)
    out = swiglu_experts(buf[local_order], recv_by_expert.sum(0), w_gate, w_up, w_down, impl)
    if tp_axes:
        out = jax.lax.psum(out, tp_axes)
    out = out[_inverse_permutation(local_order)]
    if a2a == "ragged":
        chunk_off = _exclusive_cumsum(all_sizes.reshape(p, p, e_local).sum(-1), axis=1)  # [source, dest]
        return _ragged_all_to_all(
            out, jnp.zeros((a, d), out.dtype), jnp.arange(p, dtype=jnp.int32) * s, recv, chunk_off[:, me], send,
            axis_name=ep_axis,
        )
    back = jax.lax.all_to_all(out.reshape(p, s, d), ep_axis, 0, 0, tiled=True)  # back[j]: my rows run by shard j
    r = jnp.arange(a, dtype=jnp.int32)
    dest = jnp.minimum(jnp.searchsorted(jnp.cumsum(send), r, side="right"), p - 1)
    return back[dest, jnp.clip(r - send_off[dest], 0, s - 1)]  # rows past sum(send) are zeroed by the caller


def _dispatch_shard(
    x: jax.Array, top_idx: jax.Array, top_w: jax.Array, token_mask: jax.Array,
    w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
    num_experts: int, capacity_factor: float | None, impl: str, a2a: str,
    ep_axis: str | None, ep_size: int, tp_axes: tuple[str, ...], token_axes: tuple[str, ...],
) -> tuple[jax.Array, jax.Array]:
    """One shard's (or the whole batch's) tokens -> (MoE output [N,D], dropped assignments, summed globally)."""
    n, k = top_idx.shape
    cap = None if capacity_factor is None else capacity(n, k, num_experts, capacity_factor)
    key = expert_keys(top_idx, token_mask, num_experts, cap)
    order = jnp.argsort(key, stable=True)
    rows = x[order // k]
    group_sizes = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    if ep_axis is None:
        out = swiglu_experts(rows, group_sizes, w_gate, w_up, w_down, impl)
        if tp_axes:
            out = jax.lax.psum(out, tp_axes)
    else:
        per_dest = rows.shape[0] if cap is None else min(rows.shape[0], num_experts // ep_size * cap)
        out = _exchange_and_run(
            rows, group_sizes, w_gate, w_up, w_down, ep_axis=ep_axis, ep_size=ep_size, per_dest=per_dest,
            a2a=a2a, impl=impl, tp_axes=tp_axes,
        )
    valid = key < num_experts
    out = jnp.where(valid[:, None], out[_inverse_permutation(order)], jnp.zeros((), out.dtype))
    y = jnp.sum(out.reshape(n, k, -1) * top_w[..., None].astype(out.dtype), axis=1)
    dropped = jnp.sum(token_mask, dtype=jnp.int32) * k - jnp.sum(valid, dtype=jnp.int32)
    if token_axes:
        dropped = jax.lax.psum(dropped, token_axes)
    return y.astype(x.dtype), dropped


def dispatch(
    x: jax.Array, top_idx: jax.Array, top_w: jax.Array, token_mask: jax.Array,
    w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
    capacity_factor: float | None = None, impl: str = "ragged_dot", a2a: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Tokens x [N,D] routed to experts top_idx [N,k] with weights top_w [N,k] -> (y [N,D], dropped count).

    Expert weights: w_gate, w_up [E,D,I], w_down [E,I,D]. `token_mask` [N] False = padding (no expert work).
    Under a mesh (`sail_jax.sharding.use_mesh`) this runs in a shard_map; see the module docstring.
    """
    num_experts = w_gate.shape[0]
    kw = dict(num_experts=num_experts, capacity_factor=capacity_factor, impl=impl)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _dispatch_shard(x, top_idx, top_w, token_mask, w_gate, w_up, w_down, a2a="padded", ep_axis=None,
                               ep_size=1, tp_axes=(), token_axes=(), **kw)
    token_axes = active_mesh_axes("activation_batch_moe", mesh)
    ep_axes = active_mesh_axes("exp", mesh)
    tp_axes = active_mesh_axes("mlp_moe", mesh)
    if len(ep_axes) > 1:
        raise ValueError(f"expert parallelism over several mesh axes {ep_axes} is not supported")
    ep_size = mesh.shape[ep_axes[0]] if ep_axes else 1
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the expert mesh axis size {ep_size}")
    if w_gate.shape[-1] % math.prod(mesh.shape[a] for a in tp_axes):
        tp_axes = ()  # like sharding._fit_spec: an indivisible dimension stays replicated
    shards = math.prod(mesh.shape[a] for a in token_axes)
    n = x.shape[0]
    pad = -n % shards
    if pad:  # padded tokens are masked out: no expert work, no statistics
        x, top_idx, top_w = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, top_idx, top_w))
        token_mask = jnp.pad(token_mask, (0, pad))
    tok = token_axes or None
    e_ax, t_ax = (ep_axes or None), (tp_axes or None)
    fn = functools.partial(
        _dispatch_shard, a2a=resolve_a2a(a2a) if ep_axes else "padded", ep_axis=ep_axes[0] if ep_axes else None,
        ep_size=ep_size, tp_axes=tp_axes, token_axes=token_axes, **kw,
    )
    y, dropped = jax.shard_map(
        fn,
        in_specs=(P(tok, None), P(tok, None), P(tok, None), P(tok), P(e_ax, None, t_ax), P(e_ax, None, t_ax),
                  P(e_ax, t_ax, None)),
        out_specs=(P(tok, None), P()),
        # The Pallas kernels' outputs carry no varying-axes type: that impl runs unchecked (its values and
        # gradients under data/expert/tensor meshes are tested against the single-device jnp block).
        check_vma=impl != "pallas",
    )(x, top_idx, top_w, token_mask, w_gate, w_up, w_down)
    return y[:n], dropped
