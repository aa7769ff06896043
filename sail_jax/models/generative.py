"""The one interface the inference engine drives a model through; `SailVL` and a bare `Qwen3ForCausalLM` implement it.

Why a protocol: the engine (prefill, decode, cache layout, sharding) is the same for a vision-language model and a
text-only LLM; only the prompt embedding differs (image features in `<IMG_CONTEXT>` slots or none). Methods are
flax module methods, called through `model.apply(params, ..., method=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import jax

from sail_jax.config import LLMConfig, RuntimeConfig, VisionConfig


@dataclass(frozen=True)
class ImageSlots:
    """How a model takes images: each tile fills `tokens_per_tile` prompt slots holding `context_token_id`. With
    `anyres` (the vision config of a SAIL-ViT-AnyRes model) images come instead as native-resolution patches packed
    into one sequence (`extract_feature_packed`), each filling (h/28)*(w/28) slots."""

    context_token_id: int
    tokens_per_tile: int
    anyres: VisionConfig | None = None


class GenerativeModel(Protocol):
    """A flax module (`init`, `apply`): a causal LM with an explicit KV cache (`qwen3.init_cache(llm_config, ...)`).

    A model whose `image_slots` is not None also has `extract_feature(pixel_values [T,3,H,W]) -> [T, n, D]`, the
    features that `embed_prompt` writes into the context slots; with `image_slots.anyres` it has
    `extract_feature_packed(PackedImages) -> (features [F, D], mask [F])` instead.
    """

    @property
    def llm_config(self) -> LLMConfig:
        """The language model's config: vocabulary and the cache shape (layers, kv heads, head dim)."""
        ...

    @property
    def runtime(self) -> RuntimeConfig: ...

    @property
    def image_slots(self) -> ImageSlots | None:
        """None for a text-only model."""
        ...

    def dummy_inputs(self) -> tuple[jax.Array, ...]:
        """Arguments of `init` that touch every parameter."""
        ...

    def embed_prompt(
        self, input_ids: jax.Array, features: jax.Array | None = None, feature_mask: jax.Array | None = None
    ) -> jax.Array:
        """Token embeddings [B,T,D]; with `features` [F,D] the real rows (`feature_mask` [F]) fill the context slots
        in row-major order."""
        ...

    def last_logits(
        self, embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Run the LLM on `embeds` against `cache`: float32 logits of the last column [B,V] and the new cache."""
        ...
