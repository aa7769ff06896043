"""The RL learner: per-token log-probs by the trainer's forward, and the jitted policy update on one mini-batch.

A learner batch holds whole sequences as host arrays (`pack_sequences`): `input_ids`, `positions`, `segment_ids`
[B, P + R] (prompt left-padded to P, response right-padded to R; segment 0 on padding), `pixel_values`
[B, slots, 3, H, W] and `tile_mask` [B, slots] (row-local tiles), `response_mask` [B, R] (1 on response tokens,
the final `<|im_end|>` included), and for the update `old_logp` [B, R], `advantages` [B] and, with a KL term,
`ref_logp` [B, R]. Log-probs cover the R response columns only: `logp[:, t]` is log p(response token t | ...).

Every reduction is over the whole (global) mini-batch: under `jit` with batch-sharded inputs XLA sums across
devices, so the token mean divides by the mini-batch's token count whatever the mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sail_jax.config import ModelConfig
from sail_jax.models.sail_vl import SailVL
from sail_jax.rl.loss import AGGS, LEVELS, agg_denom, agg_loss, policy_loss
from sail_jax.training.optim import global_norm, split_groups
from sail_jax.training.step import (
    TrainState,
    has_router_loss,
    lm_head_kernel,
    router_loss,
    step_metrics,
    vision_inputs,
)


@dataclass(frozen=True)
class PolicyLossConfig:
    """The update's objective. Defaults are DAPO's (token ratio, clip 0.20/0.28, token mean, no KL); GSPO sets
    level="sequence", clip 3e-4/4e-4, agg="seq-mean-token-mean". `kl_coef` > 0 adds the k3 estimate of KL(current
    || frozen reference) (token mean); `entropy_coef` > 0 subtracts that multiple of the token-mean entropy."""

    level: str = "token"
    clip_low: float = 0.20
    clip_high: float = 0.28
    agg: str = "token-mean"
    dual_clip: float | None = None
    kl_coef: float = 0.0
    entropy_coef: float = 0.0

    def __post_init__(self):
        if self.level not in LEVELS or self.agg not in AGGS:
            raise ValueError(f"PolicyLossConfig: level {self.level!r} must be one of {LEVELS} and agg {self.agg!r} "
                             f"one of {AGGS}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError(f"PolicyLossConfig: kl_coef={self.kl_coef} and entropy_coef={self.entropy_coef} must "
                             f"be >= 0")


def pack_sequences(prompts: Sequence[np.ndarray], responses: Sequence[Sequence[int]],
                   pixels: Sequence[np.ndarray | None], *, rows: int, prompt_len: int, response_len: int,
                   tile_slots: int, tile_shape: tuple[int, int, int], pad_id: int) -> dict[str, np.ndarray]:
    """Host learner batch of `rows` rows from (prompt ids, response ids, tiles) triples. Prompts are left-padded
    to `prompt_len` (segment 0, RoPE positions counted from the first real token, as the engine lays them out)
    and responses right-padded to `response_len`, so every response starts at column `prompt_len` and only those
    columns reach the lm_head. Rows beyond the given sequences are filler (empty response mask), so a short batch
    keeps the compiled shape."""
    n = len(prompts)
    if n > rows:
        raise ValueError(f"{n} sequences for a batch of {rows} rows")
    seq_len = prompt_len + response_len
    ids = np.full((rows, seq_len), pad_id, np.int32)
    seg = np.zeros((rows, seq_len), np.int32)
    seg[n:] = 1  # filler rows: one segment, nothing to learn
    resp = np.zeros((rows, response_len), np.float32)
    pix = np.zeros((rows, tile_slots, *tile_shape), np.float32)
    tile_mask = np.zeros((rows, tile_slots), bool)
    for i, (p, r, px) in enumerate(zip(prompts, responses, pixels, strict=True)):
        if len(p) > prompt_len or len(r) > response_len:
            raise ValueError(f"sequence {i}: prompt of {len(p)} tokens (at most {prompt_len}) or response of "
                             f"{len(r)} tokens (at most {response_len}) does not fit")
        ids[i, prompt_len - len(p):prompt_len], ids[i, prompt_len:prompt_len + len(r)] = p, r
        seg[i, prompt_len - len(p):prompt_len + len(r)] = 1
        resp[i, :len(r)] = 1.0
        t = 0 if px is None else len(px)
        if t > tile_slots:
            raise ValueError(f"sequence {i}: {t} tiles but the batch has {tile_slots} tile slots per row")
        if t:
            pix[i, :t], tile_mask[i, :t] = px, True
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": ids, "positions": positions, "segment_ids": seg, "pixel_values": pix,
            "tile_mask": tile_mask, "response_mask": resp}


def token_logprobs(cfg: ModelConfig, params: dict, batch: dict[str, jax.Array], temperature: float
                   ) -> tuple[jax.Array, jax.Array, dict]:
    """(log p of each response token [B, R], entropy of its next-token distribution [B, R], MoE routing sums) at
    `temperature` (the sampling distribution, before top-p); R = the response columns (`pack_sequences`). The
    lm_head runs one row at a time under `jax.checkpoint`, so [R, V] logits exist for one row and are recomputed
    in the backward pass."""
    out = SailVL(cfg).apply({"params": params}, batch["input_ids"], **vision_inputs(batch),
                            positions=batch["positions"], segment_ids=batch["segment_ids"], return_hidden=True)
    kernel = lm_head_kernel(cfg, params)
    length, response = batch["input_ids"].shape[1], batch["response_mask"].shape[1]

    @jax.checkpoint
    def row(h: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = (h @ kernel).astype(jnp.float32) / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - lse
        entropy = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
        return logp, entropy

    hidden = out.hidden[:, length - response - 1:length - 1]  # the positions that predict the response tokens
    logp, entropy = jax.lax.map(lambda x: row(*x), (hidden, batch["input_ids"][:, length - response:]))
    return logp, entropy, out.aux


def make_logprob_fn(cfg: ModelConfig, temperature: float) -> Callable[[dict, dict], jax.Array]:
    """logp(params, batch) -> [B, R] response log-probs (forward only): old-policy and reference log-probs."""
    return lambda params, batch: token_logprobs(cfg, params, batch, temperature)[0]


def make_update_step(cfg: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                     trainable: Sequence[str], loss_cfg: PolicyLossConfig, temperature: float
                     ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """update(state, batch, step) -> (state, metrics): one optimizer step on the mini-batch's policy loss (plus the
    optional KL and entropy terms and the MoE router loss). A non-finite loss or gradient leaves the state
    unchanged and reports `skipped = 1`, as the SFT step does. Jit it with the state donated."""

    def objective(train_p: dict, frozen_p: dict, batch: dict):
        logp, entropy, aux = token_logprobs(cfg, {**train_p, **frozen_p}, batch, temperature)
        mask = batch["response_mask"]
        pg, metrics = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, level=loss_cfg.level,
                                  clip_low=loss_cfg.clip_low, clip_high=loss_cfg.clip_high, agg=loss_cfg.agg,
                                  dual_clip=loss_cfg.dual_clip)
        tokens = agg_denom(mask, "token-mean")
        ent = agg_loss(entropy, mask, agg="token-mean", denom=tokens)
        total = pg - loss_cfg.entropy_coef * ent
        metrics = {**metrics, "pg_loss": pg, "entropy": ent, "response_tokens": jnp.sum(mask)}
        if loss_cfg.kl_coef:
            d = jnp.where(mask > 0, batch["ref_logp"] - logp, 0.0)
            kl = agg_loss(jnp.exp(d) - d - 1.0, mask, agg="token-mean", denom=tokens)  # k3, >= 0
            total = total + loss_cfg.kl_coef * kl
            metrics["kl_ref"] = kl
        if has_router_loss(cfg):
            aux_loss = router_loss(cfg, aux, None)
            total = total + aux_loss
            metrics["aux_loss"] = aux_loss
        metrics.update(step_metrics(cfg, {"routing": aux}))  # MoE: expert entropy, max load, dropped fraction
        return total, metrics

    def update(state: TrainState, batch: dict, step: jax.Array):
        train_p, frozen_p = split_groups(state.params, trainable)
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(train_p, frozen_p, batch)
        grad_norm = global_norm(grads)
        full_grads = {**grads, **jax.tree.map(jnp.zeros_like, frozen_p)}
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        lr = schedule(step)
        new_train = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), train_p, {k: updates[k] for k in grads})
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = TrainState(params={**state.params, **keep(new_train, train_p)},
                               opt_state=keep(opt_state, state.opt_state))
        return new_state, {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                           "skipped": 1.0 - ok.astype(jnp.float32)}

    return update
