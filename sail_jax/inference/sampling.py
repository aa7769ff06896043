"""Next-token selection: greedy, temperature, top-k, top-p (HF order: temperature -> top-k -> top-p).

Randomness is per row: each row has its own base key and step `s` uses `fold_in(key, s)`, so a row samples the
same tokens whatever else shares its batch and however many decode steps one device call runs.

Speed. A row is a whole vocabulary (151,936 logits), and XLA:CPU runs `jnp.argmax` as a serial (value, index)
reduction and `jax.random.categorical` as Gumbel noise for every entry (threefry bits for 152k floats per row and
step: ~15 ms a row). So both use plain vectorised max / min / sum passes: the argmax is the smallest index holding
the row maximum; a draw picks a group of tokens by its probability mass, then a token inside it by its mass (two
uniforms per row, the chain rule: exactly the softmax distribution; each stage resolves far fewer choices than the
vocabulary (128 groups of 1,187 tokens for Qwen's 151,936), so float32 uniforms do not starve rare tokens).
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


def _groups(x: jax.Array) -> jax.Array:
    """[B, N] -> [B, K, N / K]: group j holds entries j, j + N/K, ... (K = the largest power of two <= 256 that
    divides N; when that is below 16 and N > 256, N is padded with -inf to a multiple of 64 and K = 64). Reducing
    over the middle axis keeps XLA:CPU's loops vectorised along the long last axis (a reduction over short
    contiguous blocks runs ~8x slower)."""
    b, n = x.shape
    k = min(n & -n, 256)
    if k < 16 and n > 256:  # an odd vocabulary: pay one padded copy rather than thin groups
        x = jnp.pad(x, ((0, 0), (0, -n % 64)), constant_values=-jnp.inf)
        k = 64
    return x.reshape(b, k, -1)


def argmax(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` (first maximum; a NaN counts as the maximum) as int32, from two vectorised passes:
    the row maximum, then the smallest index holding it."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1).astype(jnp.int32)


def _draw(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Index [B] drawn with probability proportional to `weights` [B, n] (>= 0, a positive entry per row): the first
    index whose running sum exceeds `u` [B] in [0, 1) times the total; never an entry of weight 0."""
    cum = jnp.cumsum(weights, axis=-1)
    idx = jnp.sum(cum <= (u * cum[:, -1])[:, None], axis=-1)
    last = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)  # rounding can push past the end
    return jnp.minimum(idx, last)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw [B] (int32) from softmax(logits) per row, with per-row `keys` [B]; -inf logits are never drawn."""
    return draw_with(logits, jax.vmap(lambda k: jax.random.uniform(k, (2,), jnp.float32))(keys))


def draw_with(logits: jax.Array, u: jax.Array) -> jax.Array:
    """The token [B] that uniforms `u` [B, 2] select: a group of tokens by its probability mass (`u[:, 0]`), then a
    member by its own (`u[:, 1]`); by the chain rule, uniform `u` give exactly softmax(logits)."""
    groups = _groups(logits)  # [B, K, G]
    top = jnp.max(logits, axis=-1)[:, None, None]
    mass = jnp.sum(jnp.exp(groups - top), axis=1)  # [B, G]; the exp is fused into the sum, never stored
    group = _draw(mass, u[:, 0])
    members = jnp.exp(jnp.take_along_axis(groups, group[:, None, None], axis=2)[:, :, 0] - top[:, 0])  # [B, K]
    return (_draw(members, u[:, 1]) * groups.shape[2] + group).astype(jnp.int32)


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
        return argmax(logits)
    logits = logits.astype(jnp.float32) / temperature
    if kind.top_k:
        # Filter within the k largest: the values come sorted, so top-p needs no full-vocabulary sort.
        values, ids = jax.lax.top_k(logits, min(kind.top_k, logits.shape[-1]))
        if kind.top_p:
            values = jnp.where(top_p_mask(values, top_p), values, -jnp.inf)
        choice = categorical(keys, values)
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if kind.top_p:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        sorted_logits = jnp.where(top_p_mask(sorted_logits, top_p), sorted_logits, -jnp.inf)
        choice = categorical(keys, sorted_logits)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return categorical(keys, logits)


def step_keys(base: jax.Array, step: jax.Array) -> jax.Array:
    """Keys [B] for decode step `step` (0 = the token sampled from the prefill logits)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(base, step)
