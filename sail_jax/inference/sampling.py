"""Next-token selection: greedy, temperature, top-k, top-p (HF order: temperature -> top-k -> top-p).

Randomness is per row: each row has its own base key and step `s` uses `fold_in(key, s)`, so a row samples the
same tokens whatever else shares its batch and however many decode steps one device call runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sail_jax.config import IM_END_TOKEN_ID


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. `temperature == 0` means greedy (upstream's default, do_sample=False).

    `top_k == 0` and `top_p == 1` switch those filters off. Generation stops at any of `stop_token_ids` (the stop
    token is returned) or after `max_new_tokens`.
    """

    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = (IM_END_TOKEN_ID,)

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def kind(self) -> SamplerKind:
        """The static part (what gets compiled); temperature and top_p values are passed as data."""
        if self.greedy:
            return SamplerKind(greedy=True, top_k=0, top_p=False)
        return SamplerKind(greedy=False, top_k=self.top_k, top_p=self.top_p < 1)


@dataclass(frozen=True)
class SamplerKind:
    greedy: bool
    top_k: int
    top_p: bool


def top_p_mask(sorted_logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep-mask over logits sorted in descending order: the smallest prefix whose probability reaches `top_p`
    (the token that crosses the threshold is kept, so at least one token always is)."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    return before < top_p


def sample(
    logits: jax.Array, keys: jax.Array, kind: SamplerKind, temperature: jax.Array, top_p: jax.Array
) -> jax.Array:
    """One token id per row of `logits` [B, V] (float32) with per-row `keys` [B] (typed PRNG keys)."""
    if kind.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if kind.top_k:
        # Filter within the k largest: the values come sorted, so top-p needs no full-vocabulary sort.
        values, ids = jax.lax.top_k(logits, min(kind.top_k, logits.shape[-1]))
        if kind.top_p:
            values = jnp.where(top_p_mask(values, top_p), values, -jnp.inf)
        choice = jax.vmap(jax.random.categorical)(keys, values)
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if kind.top_p:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        sorted_logits = jnp.where(top_p_mask(sorted_logits, top_p), sorted_logits, -jnp.inf)
        choice = jax.vmap(jax.random.categorical)(keys, sorted_logits)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def step_keys(base: jax.Array, step: jax.Array) -> jax.Array:
    """Keys [B] for decode step `step` (0 = the token sampled from the prefill logits)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(base, step)
