"""The jitted train step: loss over target tokens of the global batch, staged freezing, gradient accumulation,
non-finite guard.

The cross-entropy is the sum over every target token of the GLOBAL batch divided by the global target count (under
jit the batch arrays are global, so this is the plain mean). Only target positions reach the lm_head, at most
`targets_per_row` per row on average (static, so shapes stay fixed): the budget is pooled over the rows of each
batch shard (`budget_groups`, one per data-parallel device), so a row with many targets borrows from its neighbours
and the selection stays shard-local. Overflow is counted in the `dropped_targets` metric. lm_head + softmax run in
chunks with their gradients formed in the forward pass (`fused_ce`), so [targets, vocab] logits never exist whole
and are not recomputed. Gradients are taken only with respect to the trainable groups. A step whose loss or
gradient norm is not finite leaves parameters and optimizer state unchanged and reports `skipped = 1`.

With `microbatches = k > 1` the step runs k micro-batches in a `lax.scan` and makes ONE update equal to that of the
whole batch: each micro-batch contributes its share of the step's loss, normalised by the counts of the WHOLE step
(`StepTotals`: the target count, read off the batch, and for a MoE model with a router loss the expert assignment
and token counts, from a forward-only pass over the micro-batches first, because the load-balancing loss is a
product of two whole-batch sums and its gradient needs the assignment counts of every micro-batch). The shares add
up to the whole batch's loss, so their gradients add up to its gradient; metrics, the guard and AdaLRS see the
step. Micro-batch j takes rows j*r..(j+1)*r-1 of every batch shard's rows (r = rows / (shards * k)), so no device
sends rows to another, and the target budget applies per micro-batch (per shard's slice of it). A tile-budgeted
batch (`data.batch`: `tile_index` [G, budget, 2]) splits the same way when its G tile groups are the shards x
micro-batches, so each micro-batch's ViT runs on its own groups' tiles only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sail_jax.config import ModelConfig
from sail_jax.data.batch import packed_images
from sail_jax.models.sail_vl import SailVL
from sail_jax.training.fused_ce import fused_linear_cross_entropy
from sail_jax.training.loss import next_token_targets, select_targets
from sail_jax.training.optim import global_norm, split_groups

# A step's normalisers (never differentiated): "targets" and, for MoE, "expert_counts" [L,E] and "num_tokens" [L].
StepTotals = dict[str, jax.Array]
# loss_terms(params, batch, totals) -> (this batch's share of the step's loss, its sums `step_metrics` reads)
LossTerms = Callable[[dict, dict, StepTotals | None], tuple[jax.Array, dict[str, Any]]]


@flax.struct.dataclass
class TrainState:
    """What the step updates on device; the step counter and AdaLRS multiplier are host-side arguments."""

    params: Any  # {"vision_model", "mlp1", "language_model"} (unboxed)
    opt_state: Any


def has_router_loss(cfg: ModelConfig) -> bool:
    moe = cfg.llm.moe
    return moe is not None and bool(moe.router_aux_loss_coef or moe.router_z_loss_coef)


def router_loss(cfg: ModelConfig, aux: dict[str, jax.Array], totals: StepTotals | None) -> jax.Array:
    """MoE router loss (weighted by the config's coefficients) of these routing sums, normalised by the step's
    `totals`; 0 without MoE layers or with both coefficients 0."""
    if not has_router_loss(cfg) or not aux:
        return jnp.zeros((), jnp.float32)
    from sail_jax.training.moe_loss import weighted_router_loss

    return weighted_router_loss(aux, cfg.llm.moe, totals).astype(jnp.float32)


def step_metrics(cfg: ModelConfig, sums: dict[str, Any]) -> dict[str, jax.Array]:
    """The loss metrics of a step from the sums of its (micro-)batches (`make_loss_terms`)."""
    metrics = {k: v for k, v in sums.items() if k != "routing"}
    if cfg.llm.moe is not None and sums["routing"]:
        from sail_jax.training.moe_loss import moe_metrics

        m = moe_metrics(sums["routing"])
        metrics.update(expert_entropy=jnp.mean(m["activation_entropy"]), expert_max_load=jnp.mean(m["max_load"]),
                       expert_dropped_fraction=jnp.mean(m["dropped_fraction"]))
    return metrics


def lm_head_kernel(cfg: ModelConfig, params: dict) -> jax.Array:
    """The [D, V] output projection: `lm_head/kernel`, or the transposed embedding when tied."""
    lm = params["language_model"]
    return lm["embed_tokens"]["embedding"].T if cfg.llm.tie_word_embeddings else lm["lm_head"]["kernel"]


def vision_inputs(batch: dict[str, jax.Array]) -> dict[str, Any]:
    """The model's image arguments from a batch: tile slots (pixel_values, tile_mask), tiles packed into a per-device
    budget (pixel_values, tile_index) or AnyRes packed `images` (`data.batch`)."""
    images = packed_images(batch)
    if images is not None:
        return {"images": images}
    pixels = batch["pixel_values"]
    if "tile_index" in batch:
        return {"pixel_values": pixels if pixels.shape[0] else None, "tile_index": batch["tile_index"]}
    return {"pixel_values": pixels if pixels.shape[1] else None, "tile_mask": batch["tile_mask"]}


def tile_count(cfg: ModelConfig, batch: dict[str, jax.Array]) -> jax.Array:
    """The `tiles` metric: real tiles, or AnyRes patches in tile equivalents (patches / 1024), which keeps the
    trainer's FLOP estimate of the ViT meaningful."""
    if "anyres_segment_ids" in batch:
        return jnp.sum(batch["anyres_segment_ids"] > 0).astype(jnp.float32) / cfg.vision.num_patches
    if "tile_index" in batch:
        return jnp.sum(batch["tile_index"][..., 0] >= 0).astype(jnp.float32)
    return jnp.sum(batch["tile_mask"]).astype(jnp.float32)


def _groups(rows: int, budget_groups: int | None) -> int:
    groups = rows if budget_groups is None else budget_groups
    if rows % groups:
        raise ValueError(f"batch of {rows} rows does not split into {groups} target-budget groups")
    return groups


def make_loss_terms(cfg: ModelConfig, targets_per_row: int, logits_chunk: int = 1024,
                    budget_groups: int | None = None) -> LossTerms:
    """terms(params, batch, totals) -> (loss share, sums).

    The share is ce_sum / totals["targets"] + this batch's part of the router loss; `totals` None means this batch
    is the whole step (its own counts). The sums (ce_loss and aux_loss shares, targets, dropped_targets, tokens,
    tiles, MoE routing sums) add over the micro-batches of a step. The batch rows are split into `budget_groups`
    contiguous groups (default: one per row) that share a budget of `targets_per_row` x rows-per-group targets.
    """
    model = SailVL(cfg)

    def terms(params: dict, batch: dict[str, jax.Array], totals: StepTotals | None = None):
        ids, seg = batch["input_ids"], batch["segment_ids"]
        out = model.apply({"params": params}, ids, positions=batch["positions"], segment_ids=seg, return_hidden=True,
                          **vision_inputs(batch))
        targets, weights = next_token_targets(ids, batch["loss_mask"], seg)
        rows = ids.shape[0]
        groups = _groups(rows, budget_groups)
        grouped = lambda x: x.reshape(groups, -1, *x.shape[2:])
        select = lambda h, t, w: select_targets(h, t, w, targets_per_row * (rows // groups))
        h, t, w, dropped = jax.vmap(select)(grouped(out.hidden), grouped(targets), grouped(weights))
        total, count = fused_linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), lm_head_kernel(cfg, params), t.reshape(-1), w.reshape(-1), logits_chunk
        )
        if totals is None:
            totals = jax.lax.stop_gradient({"targets": count, **out.aux})
        ce = total / jnp.maximum(totals["targets"], 1.0)
        aux_loss = router_loss(cfg, out.aux, totals)
        sums = {
            "ce_loss": ce,
            "aux_loss": aux_loss,
            "targets": count,
            "dropped_targets": jnp.sum(dropped).astype(jnp.float32),
            "tokens": jnp.sum(seg != 0).astype(jnp.float32),
            "tiles": tile_count(cfg, batch),
            "routing": out.aux,
        }
        return ce + aux_loss, sums

    return terms


def make_loss_fn(
    cfg: ModelConfig, targets_per_row: int, logits_chunk: int = 1024, budget_groups: int | None = None
) -> Callable[[dict, dict], tuple[jax.Array, dict[str, jax.Array]]]:
    """loss(params, batch) -> (ce + router loss, metrics) of one whole batch (`make_loss_terms`)."""
    terms = make_loss_terms(cfg, targets_per_row, logits_chunk, budget_groups)

    def loss_fn(params: dict, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        loss, sums = terms(params, batch, None)
        return loss, step_metrics(cfg, sums)

    return loss_fn


def micro_batch(batch: dict[str, jax.Array], j: jax.Array, microbatches: int, blocks: int) -> dict[str, jax.Array]:
    """Micro-batch j of `microbatches`: rows j*r..(j+1)*r-1 of each of the `blocks` contiguous row blocks (the batch
    shards), r = rows / (blocks * microbatches). A shard's slice stays on its device."""

    def one(x: jax.Array) -> jax.Array:
        r = x.shape[0] // (blocks * microbatches)
        split = x.reshape(blocks, microbatches, r, *x.shape[1:])
        return jax.lax.dynamic_index_in_dim(split, j, axis=1, keepdims=False).reshape(blocks * r, *x.shape[1:])

    return jax.tree.map(one, batch)


def budgeted_target_count(batch: dict[str, jax.Array], targets_per_row: int, microbatches: int, blocks: int
                          ) -> jax.Array:
    """The step's target count as the micro-batches' losses count it: within each shard's slice of a micro-batch,
    the first targets_per_row x rows target positions (the budget `select_targets` keeps)."""
    _, w = next_token_targets(batch["input_ids"], batch["loss_mask"], batch["segment_ids"])
    r = w.shape[0] // (blocks * microbatches)
    w = w.reshape(blocks, microbatches, -1)
    kept = jnp.cumsum(w != 0, axis=-1) <= targets_per_row * r
    return jnp.sum(jnp.where(kept, w, 0.0))


def make_train_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    trainable: Sequence[str],
    targets_per_row: int,
    budget_groups: int | None = None,
    microbatches: int = 1,
) -> Callable[[TrainState, dict, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """step(state, batch, step, lr_scale) -> (state, metrics); jit it with the state donated. With `microbatches`
    > 1 the rows are split into that many micro-batches, each a slice of every one of the `budget_groups` row
    blocks (default 1)."""
    terms = make_loss_terms(cfg, targets_per_row, budget_groups=budget_groups)
    model = SailVL(cfg)
    blocks = budget_groups or 1

    def routing_totals(params: dict, batch: dict[str, jax.Array]) -> StepTotals:
        """Forward-only pass over the micro-batches: the step's expert assignment and token counts per layer."""

        def counts(b: dict[str, jax.Array]) -> StepTotals:
            aux = model.apply({"params": params}, b["input_ids"], positions=b["positions"],
                              segment_ids=b["segment_ids"], return_hidden=True, **vision_inputs(b)).aux
            return {k: aux[k] for k in ("expert_counts", "num_tokens")}

        body = lambda acc, j: (jax.tree.map(jnp.add, acc, counts(micro_batch(batch, j, microbatches, blocks))), None)
        shapes = jax.eval_shape(counts, micro_batch(batch, 0, microbatches, blocks))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.lax.scan(body, zeros, jnp.arange(microbatches))[0]

    def accumulate(grad_fn, train_p: dict, params: dict, batch: dict[str, jax.Array]):
        """(loss, sums, grads) of the whole batch from its micro-batches; gradients summed in float32."""
        if "tile_index" in batch and batch["tile_index"].shape[0] % (blocks * microbatches):
            raise ValueError(f"{batch['tile_index'].shape[0]} tile groups do not split into {blocks} batch shards x "
                             f"{microbatches} micro-batches; set the data's num_devices to shards x micro-batches")
        totals = {"targets": budgeted_target_count(batch, targets_per_row, microbatches, blocks)}
        if has_router_loss(cfg):
            totals.update(routing_totals(params, batch))
        totals = jax.lax.stop_gradient(totals)

        def body(acc, j):
            (loss, sums), grads = grad_fn(train_p, micro_batch(batch, j, microbatches, blocks), totals)
            return jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc, (loss, sums, grads)), None

        shapes = jax.eval_shape(lambda: grad_fn(train_p, micro_batch(batch, 0, microbatches, blocks), totals))
        (loss_shape, sums_shape), grads_shape = shapes
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
                             (loss_shape, sums_shape, grads_shape))
        loss, sums, grads = jax.lax.scan(body, zeros, jnp.arange(microbatches))[0]
        return loss, sums, jax.tree.map(lambda g, s: g.astype(s.dtype), grads, grads_shape)

    def train_step(state: TrainState, batch: dict, step: jax.Array, lr_scale: jax.Array):
        train_p, frozen_p = split_groups(state.params, trainable)
        grad_fn = jax.value_and_grad(lambda tp, b, totals: terms({**tp, **frozen_p}, b, totals), has_aux=True)
        if microbatches == 1:
            (loss, sums), grads = grad_fn(train_p, batch, None)
        else:
            loss, sums, grads = accumulate(grad_fn, train_p, state.params, batch)
        grad_norm = global_norm(grads)
        full_grads = {**grads, **jax.tree.map(jnp.zeros_like, frozen_p)}
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        lr = schedule(step) * lr_scale
        new_train = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), train_p, {k: updates[k] for k in grads})
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = TrainState(params={**state.params, **keep(new_train, train_p)},
                               opt_state=keep(opt_state, state.opt_state))
        metrics = {**step_metrics(cfg, sums), "loss": loss, "grad_norm": grad_norm, "lr": lr,
                   "skipped": 1.0 - ok.astype(jnp.float32)}
        return new_state, metrics

    return train_step
