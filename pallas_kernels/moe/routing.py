"""MoE routing kernel: softmax -> top-k -> (optional) renormalise -> per-expert counts and the expert-sorted order.

One kernel body serves Mosaic and Triton. It works on token blocks laid out expert-major ([E, bt]: experts on
sublanes, tokens on lanes) so every per-token result is a lane-dense row. Per block it emits the top-k weights and
ids, each assignment's rank among earlier same-expert assignments of the block (an exclusive prefix count, done as
a [E, bt] @ [bt, bt] strictly-upper-triangular matmul on the MXU / tensor cores), and per-expert counts. A token's
k experts are distinct, so "earlier assignment" = "earlier token" and the ranks reproduce a stable sort of the
flattened (token, slot) ids. The one-hot lives only in VMEM/registers; outside the kernel only O(T*k + blocks*E)
integers are combined (block offsets and the inverse-permutation scatter).

The backward (custom VJP) is plain jnp: only the weights are differentiable, and their gradient w.r.t. the logits
is that of softmax -> gather of the chosen experts -> renormalise, recomputed from the saved logits and ids.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._backend import Target, next_pow2, resolve, round_up


def _route_kernel(logits_ref, w_ref, ids_ref, rank_ref, counts_ref, *, k: int, num_tokens: int, norm: bool):
    e, bt = logits_ref.shape
    x = logits_ref[...].astype(jnp.float32)
    x = x - jnp.max(x, axis=0, keepdims=True)
    ex = jnp.exp(x)
    probs = ex / jnp.sum(ex, axis=0, keepdims=True)
    expert = jax.lax.broadcasted_iota(jnp.int32, (e, bt), 0).astype(jnp.float32)  # f32: reductions TPUs like
    token = pl.program_id(0) * bt + jax.lax.broadcasted_iota(jnp.int32, (e, bt), 1)
    real = token < num_tokens

    remaining, chosen = probs, jnp.zeros((e, bt), jnp.float32)
    weights, ids = [], []
    for _ in range(k):  # iterative arg-max; ties go to the lowest expert index (as lax.top_k)
        top = jnp.max(remaining, axis=0, keepdims=True)
        idx = jnp.min(jnp.where(remaining == top, expert, float(e)), axis=0, keepdims=True)
        hit = expert == idx
        remaining = jnp.where(hit, -1.0, remaining)  # probabilities are >= 0: -1 never wins again
        chosen = chosen + jnp.where(hit & real, 1.0, 0.0)
        weights.append(top)
        ids.append(idx)
    if norm:
        total = functools.reduce(jnp.add, weights)
        weights = [w / total for w in weights]

    upper = jax.lax.broadcasted_iota(jnp.int32, (bt, bt), 0) < jax.lax.broadcasted_iota(jnp.int32, (bt, bt), 1)
    earlier = jax.lax.dot(chosen.astype(jnp.bfloat16), upper.astype(jnp.bfloat16),
                          preferred_element_type=jnp.float32)  # [e, bt]: same-expert tokens before each token
    for s in range(w_ref.shape[0]):
        row = pl.ds(s, 1)
        if s < k:
            w_ref[row, :] = weights[s]
            ids_ref[row, :] = ids[s].astype(jnp.int32)
            rank_ref[row, :] = jnp.sum(jnp.where(expert == ids[s], earlier, 0.0), axis=0,
                                       keepdims=True).astype(jnp.int32)
        else:  # padding slots (Triton needs a power-of-two slot count)
            w_ref[row, :] = jnp.zeros((1, bt), jnp.float32)
            ids_ref[row, :] = jnp.zeros((1, bt), jnp.int32)
            rank_ref[row, :] = jnp.zeros((1, bt), jnp.int32)
    counts_ref[...] = jnp.sum(chosen, axis=1, keepdims=True).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Config:
    k: int
    norm: bool
    block_tokens: int
    experts_padded: int
    slots: int
    target: Target


def _route_call(router_logits: jax.Array, cfg: _Config) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    t, e = router_logits.shape
    k, bt, ep, kp = cfg.k, cfg.block_tokens, cfg.experts_padded, cfg.slots
    tp = round_up(t, bt)
    nb = tp // bt
    # expert-major; padded experts get -inf logits (probability 0, higher index: never picked before a real one)
    logits = jnp.pad(router_logits.astype(jnp.float32).T, ((0, ep - e), (0, 0)), constant_values=-jnp.inf)
    logits = jnp.pad(logits, ((0, 0), (0, tp - t)))
    slot = pl.BlockSpec((kp, bt), lambda i: (0, i))
    w, ids, rank, counts = pl.pallas_call(
        functools.partial(_route_kernel, k=k, num_tokens=t, norm=cfg.norm),
        grid=(nb,),
        in_specs=[pl.BlockSpec((ep, bt), lambda i: (0, i))],
        out_specs=[slot, slot, slot, pl.BlockSpec((None, ep, 1), lambda i: (i, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((kp, tp), jnp.float32), jax.ShapeDtypeStruct((kp, tp), jnp.int32),
                   jax.ShapeDtypeStruct((kp, tp), jnp.int32), jax.ShapeDtypeStruct((nb, ep, 1), jnp.int32)],
        compiler_params=cfg.target.compiler_params(dimension_semantics=("parallel",)),
        interpret=cfg.target.interpret_arg(),
        name="moe_route",
    )(logits)
    weights, expert_ids, rank = w[:k, :t].T, ids[:k, :t].T, rank[:k, :t].T
    counts = counts[:, :e, 0]  # [nb, E]
    group_sizes = jnp.sum(counts, axis=0)
    base = (jnp.cumsum(group_sizes) - group_sizes)[None, :] + jnp.cumsum(counts, axis=0) - counts  # [nb, E]
    block = (jnp.arange(t, dtype=jnp.int32) // bt)[:, None]
    position = base[block, expert_ids] + rank  # where each (token, slot) lands in expert-sorted order
    sort_indices = jnp.zeros((t * k,), jnp.int32).at[position.reshape(-1)].set(
        jnp.arange(t * k, dtype=jnp.int32), unique_indices=True)
    return weights, expert_ids, group_sizes.astype(jnp.int32), sort_indices


def _chosen_weights(router_logits: jax.Array, expert_ids: jax.Array, norm: bool) -> jax.Array:
    """The top-k weights as a jnp function of the logits for fixed expert ids: softmax in float32, the chosen
    entries, optional renormalisation. Its VJP is the gradient of softmax -> top_k (whose VJP scatters into the
    chosen entries) -> renormalise, i.e. of the plain-jnp routing."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights = jnp.take_along_axis(probs, expert_ids, axis=-1)
    if norm:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _route(router_logits: jax.Array, cfg: _Config) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    return _route_call(router_logits, cfg)


def _route_fwd(router_logits: jax.Array, cfg: _Config):
    out = _route_call(router_logits, cfg)
    return out, (router_logits, out[1])


def _route_bwd(cfg: _Config, res: tuple[jax.Array, jax.Array], cotangents: tuple):
    # Only the weights are differentiable (ids, counts and order are integers): recompute the softmax in jnp,
    # which costs O(T*E), and pull the weights' cotangent back through it.
    router_logits, expert_ids = res
    _, vjp = jax.vjp(lambda x: _chosen_weights(x, expert_ids, cfg.norm), router_logits)
    return vjp(cotangents[0].astype(jnp.float32))


_route.defvjp(_route_fwd, _route_bwd)


def route(
    router_logits: jax.Array,
    k: int,
    *,
    norm_topk_prob: bool,
    block_tokens: int | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """router_logits [T,E] -> (weights [T,k] f32, expert_ids [T,k] int32, group_sizes [E] int32,
    sort_indices [T*k] int32), where sort_indices is the stable argsort of expert_ids.reshape(-1).

    Differentiable in router_logits through the weights (custom VJP, the gradient of the plain-jnp routing).
    `backend`/`interpret`/`platform` (where the code will run, None: `jax.default_backend()`): see
    `pallas_kernels._backend.resolve`.
    """
    if router_logits.ndim != 2:
        raise ValueError(f"router_logits must be [T, E], got {router_logits.shape}")
    t, e = router_logits.shape
    if not 0 < k <= e:
        raise ValueError(f"k={k} must be in [1, num_experts={e}]")
    if not jnp.issubdtype(router_logits.dtype, jnp.floating):
        raise TypeError(f"router_logits must be floating point, got {router_logits.dtype}")
    target = resolve(backend, interpret, platform)
    if target.backend == "mosaic":
        bt = block_tokens or min(512, round_up(t, 128))
        ep, kp = round_up(e, 8), k
        if bt % 128:
            raise ValueError(f"mosaic routing block_tokens={bt} must be a multiple of 128")
    else:
        bt = block_tokens or min(32, max(16, next_pow2(t)))
        ep, kp = max(16, next_pow2(e)), next_pow2(k)
        if bt < 16 or bt & (bt - 1):
            raise ValueError(f"triton routing block_tokens={bt} must be a power of two >= 16")
    return _route(router_logits, _Config(k, bool(norm_topk_prob), bt, ep, kp, target))
