"""Qwen3-MoE sparse block: linear router, fp32 softmax top-k, dropless SwiGLU experts (transformers v5 numerics).

`RuntimeConfig.moe_impl="pallas"` selects both Pallas MoE kernels: the routing kernel (top-k here) and the grouped
matmul (the experts, in `moe_dispatch`).

Param tree (names fixed by converters/mapping.py): `gate/kernel` [D,E] (the router), `experts/gate_proj` and
`experts/up_proj` [E,D,I], `experts/down_proj` [E,I,D].

The block returns per-layer routing *sums* rather than a loss, because transformers' load-balancing loss pools
the router statistics of all layers before forming c_e * P_e; `sail_jax.training.moe_loss` turns the stacked
sums into that loss and into metrics. The sums are taken over the non-padding tokens of the global (sharded)
batch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sail_jax.config import LLMConfig, RuntimeConfig
from sail_jax.layers.common import as_dtype, constrain, default_kernel_init, dense
from sail_jax.layers.moe_dispatch import dispatch

MOE_ACT = ("activation_batch_moe", "activation_length", "activation_embed")

AUX_KEYS = ("expert_counts", "router_prob_sum", "num_tokens", "router_z_sum", "dropped")


def route(
    logits: jax.Array, top_k: int, norm_topk_prob: bool, impl: str = "ragged_dot"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits [...,E] -> (fp32 probabilities, top-k weights in the logits' dtype, top-k expert ids).

    As transformers: softmax in float32, top-k of the probabilities, optional renormalisation, then a cast.
    `impl="pallas"` (the `moe_impl`) takes the top-k from the routing kernel, whose VJP is this jnp routing's
    gradient; the probabilities (for the load-balancing statistics) stay jnp either way.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if impl == "pallas":
        top_w, top_idx = _pallas_top_k(logits, top_k, norm_topk_prob)
    else:
        top_w, top_idx = jax.lax.top_k(probs, top_k)
        if norm_topk_prob:
            top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return probs, top_w.astype(logits.dtype), top_idx.astype(jnp.int32)


def _pallas_top_k(logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """Top-k weights (f32) and ids from `pallas_kernels.moe.route`. Under a mesh it runs per batch shard inside
    `jax.shard_map` (routing is per token), since XLA cannot partition a Pallas call and would gather the logits."""
    from jax.sharding import PartitionSpec as P

    from pallas_kernels.moe import route as route_kernel
    from sail_jax.sharding import active_mesh_axes, target_platform

    platform = target_platform()  # the mesh's: a CPU host compiling for a TPU mesh gets the Mosaic lowering

    def call(x):
        w, ids, _, _ = route_kernel(x.reshape(-1, x.shape[-1]), top_k, norm_topk_prob=norm_topk_prob,
                                    platform=platform)
        return w.reshape(*x.shape[:-1], top_k), ids.reshape(*x.shape[:-1], top_k)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or logits.ndim < 2:
        return call(logits)
    spec = P(active_mesh_axes("activation_batch_moe", mesh, logits.shape[0]) or None, *[None] * (logits.ndim - 1))
    # check_vma=False: pallas_call outputs carry no varying-axes annotation; every shard is independent here.
    return jax.shard_map(call, in_specs=(spec,), out_specs=(spec, spec), check_vma=False)(logits)


def routing_sums(
    logits: jax.Array, probs: jax.Array, top_idx: jax.Array, token_mask: jax.Array, num_experts: int
) -> dict[str, jax.Array]:
    """Per-layer sums over non-padding tokens: top-k assignment counts [E], probability sums [E], token count,
    and the sum of squared router log-partition values (for the z-loss)."""
    m = token_mask.reshape(-1).astype(jnp.float32)
    chosen = jnp.sum(jax.nn.one_hot(top_idx.reshape(m.shape[0], -1), num_experts, dtype=jnp.float32), axis=1)
    lse = jax.nn.logsumexp(logits.reshape(-1, num_experts).astype(jnp.float32), axis=-1)
    return {
        "expert_counts": m @ chosen,
        "router_prob_sum": m @ probs.reshape(-1, num_experts),
        "num_tokens": jnp.sum(m),
        "router_z_sum": jnp.sum(m * lse**2),
    }


class MoEExperts(nn.Module):
    """The stacked expert weights (SwiGLU), logically partitioned over `exp` / `embed_moe` / `mlp_moe`."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        e, d, i = self.num_experts, self.hidden_size, self.intermediate_size
        dt = as_dtype(self.param_dtype)
        init = default_kernel_init()

        def param(name, shape, axes):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, dt)

        return (
            param("gate_proj", (e, d, i), ("exp", "embed_moe", "mlp_moe")),
            param("up_proj", (e, d, i), ("exp", "embed_moe", "mlp_moe")),
            param("down_proj", (e, i, d), ("exp", "mlp_moe", "embed_moe")),
        )


class MoEBlock(nn.Module):
    """x [B,T,D], token_mask [B,T] (False = padding) -> (y [B,T,D], routing sums for this layer)."""

    cfg: LLMConfig
    rt: RuntimeConfig

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        moe, rt = self.cfg.moe, self.rt
        if moe is None:
            raise ValueError("MoEBlock needs LLMConfig.moe to be set")
        if x.ndim != 3 or x.shape[-1] != self.cfg.hidden_size or token_mask.shape != x.shape[:2]:
            raise ValueError(
                f"MoEBlock expects x [B,T,{self.cfg.hidden_size}] and token_mask [B,T]; got {x.shape} and "
                f"{token_mask.shape}"
            )
        b, t, d = x.shape
        e, k = moe.num_experts, moe.num_experts_per_tok
        dtype = as_dtype(rt.dtype)
        x = constrain(x.astype(dtype), MOE_ACT)
        token_mask = token_mask.astype(bool)
        logits = dense(e, ("embed", None), name="gate", dtype=rt.dtype, param_dtype=rt.param_dtype)(x)
        logits = constrain(logits, ("activation_batch_moe", "activation_length", None))
        probs, top_w, top_idx = route(logits, k, moe.norm_topk_prob, rt.moe_impl)
        w_gate, w_up, w_down = MoEExperts(
            e, d, moe.moe_intermediate_size, param_dtype=rt.param_dtype, name="experts"
        )()
        y, dropped = dispatch(
            x.reshape(b * t, d), top_idx.reshape(b * t, k), top_w.reshape(b * t, k), token_mask.reshape(b * t),
            w_gate.astype(dtype), w_up.astype(dtype), w_down.astype(dtype),
            capacity_factor=moe.capacity_factor, impl=rt.moe_impl, a2a=rt.moe_a2a,
        )
        aux = routing_sums(logits, probs, top_idx, token_mask, e)
        aux["dropped"] = dropped.astype(jnp.float32)
        return constrain(y.reshape(b, t, d), MOE_ACT), aux
