"""The jitted train step: loss over target tokens of the global batch, staged freezing, non-finite guard.

The cross-entropy is the sum over every target token of the GLOBAL batch divided by the global target count (under
jit the batch arrays are global, so this is the plain mean). Only target positions reach the lm_head, at most
`targets_per_row` per row on average (static, so shapes stay fixed): the budget is pooled over the rows of each
batch shard (`budget_groups`, one per data-parallel device), so a row with many targets borrows from its neighbours
and the selection stays shard-local. Overflow is counted in the `dropped_targets` metric. lm_head + softmax run in
chunks with their gradients formed in the forward pass (`fused_ce`), so [targets, vocab] logits never exist whole
and are not recomputed. Gradients are taken only with respect to the trainable groups. A step whose loss or
gradient norm is not finite leaves parameters and optimizer state unchanged and reports `skipped = 1`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sail_jax.config import ModelConfig
from sail_jax.models.sail_vl import SailVL
from sail_jax.training.fused_ce import fused_linear_cross_entropy
from sail_jax.training.loss import next_token_targets, select_targets
from sail_jax.training.optim import global_norm, split_groups


@flax.struct.dataclass
class TrainState:
    """What the step updates on device; the step counter and AdaLRS multiplier are host-side arguments."""

    params: Any  # {"vision_model", "mlp1", "language_model"} (unboxed)
    opt_state: Any


def router_terms(cfg: ModelConfig, aux: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MoE router loss (already weighted by the config's coefficients) and routing metrics."""
    if cfg.llm.moe is None or not aux:
        return jnp.zeros((), jnp.float32), {}
    from sail_jax.training.moe_loss import moe_metrics, weighted_router_loss

    m = moe_metrics(aux)
    metrics = {
        "expert_entropy": jnp.mean(m["activation_entropy"]),
        "expert_max_load": jnp.mean(m["max_load"]),
        "expert_dropped_fraction": jnp.mean(m["dropped_fraction"]),
    }
    return weighted_router_loss(aux, cfg.llm.moe).astype(jnp.float32), metrics


def lm_head_kernel(cfg: ModelConfig, params: dict) -> jax.Array:
    """The [D, V] output projection: `lm_head/kernel`, or the transposed embedding when tied."""
    lm = params["language_model"]
    return lm["embed_tokens"]["embedding"].T if cfg.llm.tie_word_embeddings else lm["lm_head"]["kernel"]


def make_loss_fn(
    cfg: ModelConfig, targets_per_row: int, logits_chunk: int = 1024, budget_groups: int | None = None
) -> Callable[[dict, dict], tuple[jax.Array, dict[str, jax.Array]]]:
    """loss(params, batch) -> (ce + router loss, metrics).

    The batch rows are split into `budget_groups` contiguous groups (default: one per row) that share a
    budget of `targets_per_row` x rows-per-group target positions.
    """
    model = SailVL(cfg)

    def loss_fn(params: dict, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        ids, seg = batch["input_ids"], batch["segment_ids"]
        pixels = batch["pixel_values"] if batch["pixel_values"].shape[1] else None
        out = model.apply(
            {"params": params}, ids, pixels, batch["tile_mask"], positions=batch["positions"], segment_ids=seg,
            return_hidden=True,
        )
        targets, weights = next_token_targets(ids, batch["loss_mask"], seg)
        rows = ids.shape[0]
        groups = rows if budget_groups is None else budget_groups
        if rows % groups:
            raise ValueError(f"batch of {rows} rows does not split into {groups} target-budget groups")
        grouped = lambda x: x.reshape(groups, -1, *x.shape[2:])
        select = lambda h, t, w: select_targets(h, t, w, targets_per_row * (rows // groups))
        h, t, w, dropped = jax.vmap(select)(grouped(out.hidden), grouped(targets), grouped(weights))
        total, count = fused_linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), lm_head_kernel(cfg, params), t.reshape(-1), w.reshape(-1), logits_chunk
        )
        ce = total / jnp.maximum(count, 1.0)
        router_loss, moe_metrics = router_terms(cfg, out.aux)
        metrics = {
            "ce_loss": ce,
            "aux_loss": router_loss,
            "targets": count,
            "dropped_targets": jnp.sum(dropped).astype(jnp.float32),
            "tokens": jnp.sum(seg != 0).astype(jnp.float32),
            "tiles": jnp.sum(batch["tile_mask"]).astype(jnp.float32),
            **moe_metrics,
        }
        return ce + router_loss, metrics

    return loss_fn


def make_train_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    trainable: Sequence[str],
    targets_per_row: int,
    budget_groups: int | None = None,
) -> Callable[[TrainState, dict, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """step(state, batch, step, lr_scale) -> (state, metrics); jit it with the state donated."""
    loss_fn = make_loss_fn(cfg, targets_per_row, budget_groups=budget_groups)

    def train_step(state: TrainState, batch: dict, step: jax.Array, lr_scale: jax.Array):
        train_p, frozen_p = split_groups(state.params, trainable)
        grad_fn = jax.value_and_grad(lambda tp: loss_fn({**tp, **frozen_p}, batch), has_aux=True)
        (loss, metrics), grads = grad_fn(train_p)
        grad_norm = global_norm(grads)
        full_grads = {**grads, **jax.tree.map(jnp.zeros_like, frozen_p)}
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        lr = schedule(step) * lr_scale
        new_train = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), train_p, {k: updates[k] for k in grads})
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = TrainState(params={**state.params, **keep(new_train, train_p)},
                               opt_state=keep(opt_state, state.opt_state))
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped": 1.0 - ok.astype(jnp.float32)}
        return new_state, metrics

    return train_step
