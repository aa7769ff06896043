"""Router losses and metrics from the per-layer routing sums of `sail_jax.layers.moe.MoEBlock`.

`aux` is `LMOutput.aux`: a dict of arrays whose leading axis is the MoE layer (a single layer's dict works too).
transformers' Qwen3-MoE loss concatenates the router logits of all layers over the non-padding tokens, so
c_e = (top-k assignments to e, all layers) / (tokens x layers), P_e = (probability mass on e, all layers) /
(tokens x layers), and aux = E * sum_e c_e * P_e (uniform routing gives k). Pooling the sums first reproduces it
exactly; the sums cover the global batch, i.e. every data-parallel shard.

With gradient accumulation a step's batch is several micro-batches, and aux needs sums over all of them: given the
step's `totals` (assignment counts and token counts, which carry no gradient), E * sum_e c_e * P_e is linear in the
probability sums, so each micro-batch's share E * sum_e c_e * P_e^(m) (and z_sum^(m) / tokens for the z-loss) adds
up to the step's loss and its gradient to the step's gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sail_jax.config import MoEConfig
from sail_jax.layers.moe import AUX_KEYS


def _per_layer(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Stacked sums with a leading layer axis: vectors [L,E], scalars [L]."""
    missing = [k for k in AUX_KEYS if k not in aux]
    if missing:
        raise ValueError(f"MoE aux dict lacks {missing}; expected the sums returned by MoEBlock")
    e = aux["expert_counts"].shape[-1]
    out = {k: aux[k].reshape(-1, e) for k in ("expert_counts", "router_prob_sum")}
    out.update({k: aux[k].reshape(-1) for k in ("num_tokens", "router_z_sum", "dropped")})
    return out


def _step_counts(aux: dict[str, jax.Array], totals: dict[str, jax.Array] | None) -> tuple[jax.Array, jax.Array]:
    """(assignment counts per expert, token count) over the step's layers: from `totals` when given, else aux."""
    src = aux if totals is None else totals
    e = src["expert_counts"].shape[-1]
    counts = jnp.sum(src["expert_counts"].reshape(-1, e), axis=0)
    return counts, jnp.maximum(jnp.sum(src["num_tokens"]), 1.0)


def load_balancing_loss(aux: dict[str, jax.Array], moe_cfg: MoEConfig,
                        totals: dict[str, jax.Array] | None = None) -> jax.Array:
    """transformers' `load_balancing_loss_func` value (unweighted); 0 for a model without MoE layers. With the
    step's `totals` ("expert_counts", "num_tokens"), aux's share of the step's loss."""
    if not aux:
        return jnp.zeros((), jnp.float32)
    a = _per_layer(aux)
    e = a["expert_counts"].shape[-1]
    if e != moe_cfg.num_experts:
        raise ValueError(f"aux has {e} experts but MoEConfig.num_experts={moe_cfg.num_experts}")
    counts, rows = _step_counts(aux, totals)
    frac = counts / rows
    prob = jnp.sum(a["router_prob_sum"], axis=0) / rows
    return e * jnp.sum(frac * prob)


def router_z_loss(aux: dict[str, jax.Array], totals: dict[str, jax.Array] | None = None) -> jax.Array:
    """ST-MoE z-loss: mean over tokens and MoE layers of logsumexp(router logits)^2 (aux's share with `totals`)."""
    if not aux:
        return jnp.zeros((), jnp.float32)
    a = _per_layer(aux)
    return jnp.sum(a["router_z_sum"]) / _step_counts(aux, totals)[1]


def weighted_router_loss(aux: dict[str, jax.Array], moe_cfg: MoEConfig,
                         totals: dict[str, jax.Array] | None = None) -> jax.Array:
    """The term added to the training loss: router_aux_loss_coef * aux + router_z_loss_coef * z (z off at 0)."""
    total = moe_cfg.router_aux_loss_coef * load_balancing_loss(aux, moe_cfg, totals)
    if moe_cfg.router_z_loss_coef:
        total = total + moe_cfg.router_z_loss_coef * router_z_loss(aux, totals)
    return total


def moe_metrics(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-layer routing metrics (leading axis = MoE layer).

    expert_load [L,E]: share of top-k assignments per expert (the load histogram); max_load [L]: the busiest
    expert's share times E (1 = balanced); activation_entropy [L]: -sum_e Pbar_e log Pbar_e with Pbar the mean
    routing probability (log E = uniform); dropped_fraction [L]: assignments lost to the capacity factor.
    """
    a = _per_layer(aux)
    e = a["expert_counts"].shape[-1]
    counts = a["expert_counts"]
    load = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
    tokens = jnp.maximum(a["num_tokens"], 1.0)
    p_bar = a["router_prob_sum"] / tokens[:, None]
    entropy = -jnp.sum(jnp.where(p_bar > 0, p_bar * jnp.log(jnp.where(p_bar > 0, p_bar, 1.0)), 0.0), axis=-1)
    return {
        "expert_load": load,
        "max_load": jnp.max(load, axis=-1) * e,
        "activation_entropy": entropy,
        "dropped_fraction": a["dropped"] / jnp.maximum(jnp.sum(counts, axis=-1), 1.0),
    }
