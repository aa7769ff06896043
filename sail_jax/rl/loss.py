"""Clipped policy-gradient losses for RL post-training: DAPO/GRPO (token-level ratio) and GSPO (sequence-level ratio).

Every reduction is a global sum over the arrays it is given, so under `jax.jit` with batch-sharded inputs XLA reduces
over the whole mini-batch: the token mean divides by the mini-batch's token count, not a mean of per-device means.
Code that splits a mini-batch itself (micro-batches, `shard_map`) calls `per_token_loss` and `agg_loss` with the
mini-batch's `denom` (from `agg_denom`) and sums the parts.

Metric conventions (per response token, over the same tokens as the loss):
- `clip_frac_high`: A > 0 and r > 1 + clip_high: the upper clip is active (the token's gradient is cut off).
- `clip_frac_low`: A < 0 and r < 1 - clip_low: the lower clip is active. A token with A > 0 and a small ratio (or
  A < 0 and a large one) keeps the unclipped term, so it counts in neither.
- `dual_clip_frac`: A < 0 and -A·c is below the clipped loss (the dual clip bounds it); 0 without dual clip.
  verl logs clip_frac_high + clip_frac_low as `pg_clipfrac` and this one as `pg_clipfrac_lower`.
- `approx_kl`: mean of old_logp - logp (the k1 estimate of KL(old || current) on the sampled tokens).
- `ratio_mean`: mean of the ratio used in the objective (GSPO: each token carries its sequence's ratio).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LEVELS = ("token", "sequence")
AGGS = ("token-mean", "seq-mean-token-mean")
TOKEN_LOG_RATIO_BOUND = 20.0  # token level: log r clamped to [-20, 20] before exp
SEQ_LOG_RATIO_MAX = 10.0  # sequence level: log s capped at 10 before exp


def _check(level: str, agg: str, clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if level not in LEVELS:
        raise ValueError(f"level={level!r}; expected one of {LEVELS}")
    if agg not in AGGS:
        raise ValueError(f"agg={agg!r}; expected one of {AGGS}")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"clip_low must be in [0, 1) and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None:
        if level != "token":
            raise ValueError("dual_clip applies to level='token' only (GSPO has no dual clip)")
        if not dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")


def _token_advantages(advantages: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    return jnp.broadcast_to(advantages, shape)


def per_token_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *, level: str,
                   clip_low: float, clip_high: float, dual_clip: float | None = None) -> tuple[jax.Array, dict]:
    """Unreduced clipped loss [B, T] (zero outside the mask) and per-token metric terms (also [B, T], zero outside
    the mask) that `agg_loss(..., agg="token-mean")` turns into the metrics of `policy_loss`."""
    _check(level, "token-mean", clip_low, clip_high, dual_clip)
    mask = mask.astype(jnp.float32)
    valid = mask > 0
    # Masked positions may hold anything (even -inf log-probs): zero their difference before any arithmetic.
    log_ratio = jnp.where(valid, logp.astype(jnp.float32) - old_logp.astype(jnp.float32), 0.0)
    adv = _token_advantages(advantages.astype(jnp.float32), logp.shape)
    if level == "token":
        ratio = jnp.exp(jnp.clip(log_ratio, -TOKEN_LOG_RATIO_BOUND, TOKEN_LOG_RATIO_BOUND))
    else:
        # GSPO: s_i = exp(masked mean of log r); the per-token form sg[log s_i] + logp - sg[logp] has the value of
        # log s_i and the gradient of logp, which makes the token-mean of -A·ratio differentiate like -A·s_i.
        n = jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
        log_s = jax.lax.stop_gradient(log_ratio.sum(-1, keepdims=True) / n)
        logp32 = jnp.where(valid, logp.astype(jnp.float32), 0.0)
        ratio = jnp.exp(jnp.minimum(log_s + logp32 - jax.lax.stop_gradient(logp32), SEQ_LOG_RATIO_MAX))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual_active = jnp.zeros_like(valid)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (bound < loss)
        loss = jnp.where(adv < 0, jnp.minimum(bound, loss), loss)
    terms = {
        "clip_frac_high": clip_active & (adv > 0),
        "clip_frac_low": clip_active & (adv < 0),
        "dual_clip_frac": dual_active,
        "approx_kl": -log_ratio,
        "ratio_mean": jax.lax.stop_gradient(ratio),
    }
    terms = {k: jnp.where(valid, v.astype(jnp.float32), 0.0) for k, v in terms.items()}
    return jnp.where(valid, loss, 0.0), terms


def agg_denom(mask: jax.Array, agg: str) -> jax.Array:
    """The normaliser of `agg` over the rows of `mask`: the response-token count ("token-mean") or the number of
    sequences with at least one response token ("seq-mean-token-mean"), floored at 1 so an empty batch gives 0."""
    if agg not in AGGS:
        raise ValueError(f"agg={agg!r}; expected one of {AGGS}")
    mask = mask.astype(jnp.float32)
    count = mask.sum() if agg == "token-mean" else (mask.sum(-1) > 0).sum().astype(jnp.float32)
    return jnp.maximum(count, 1.0)


def agg_loss(loss_mat: jax.Array, mask: jax.Array, *, agg: str, denom: jax.Array | float | None = None) -> jax.Array:
    """Reduce a per-token loss [B, T] to a scalar. `denom` defaults to `agg_denom(mask, agg)`; pass the whole
    mini-batch's value when reducing a part of it, so the parts sum to the mini-batch loss."""
    denom = agg_denom(mask, agg) if denom is None else denom
    mask = mask.astype(jnp.float32)
    masked = jnp.where(mask > 0, loss_mat, 0.0)
    if agg == "token-mean":
        return masked.sum() / denom
    seq_mean = masked.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)  # rows without tokens contribute 0
    return seq_mean.sum() / denom


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *, level: str,
                clip_low: float, clip_high: float, agg: str,
                dual_clip: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate loss to minimise and its metrics (`clip_frac_high`, `clip_frac_low`, `dual_clip_frac`,
    `approx_kl`, `ratio_mean`; token means over the response, see the module docstring).

    logp, old_logp, mask: [B, T] over response tokens; advantages: [B] or [B, T]. level="token" (DAPO/GRPO) or
    "sequence" (GSPO); agg="token-mean" or "seq-mean-token-mean"; dual_clip=c > 1 bounds the loss of A < 0 tokens
    by -A·c (token level only)."""
    _check(level, agg, clip_low, clip_high, dual_clip)
    loss_mat, terms = per_token_loss(logp, old_logp, advantages, mask, level=level, clip_low=clip_low,
                                     clip_high=clip_high, dual_clip=dual_clip)
    tokens = agg_denom(mask, "token-mean")
    metrics = {k: agg_loss(v, mask, agg="token-mean", denom=tokens) for k, v in terms.items()}
    return agg_loss(loss_mat, mask, agg=agg), metrics
