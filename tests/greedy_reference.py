"""Greedy decoding by full recomputation: the simplest correct loop, the test reference for the KV-cache engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sail_jax.models.anyres import PackedImages
from sail_jax.models.sail_vl import SailVL


def greedy_full_recompute(
    model: SailVL,
    params: dict,
    input_ids: np.ndarray,
    pixel_values: np.ndarray | None,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    images: PackedImages | None = None,
) -> tuple[list[int], np.ndarray]:
    """New token ids (prompt not echoed) and the [steps, V] logits of each step. Batch size 1. `images`: packed
    AnyRes images in place of `pixel_values`.

    The sequence lives in one static buffer of N + max_new_tokens slots; unfilled slots are padding
    (segment id 0) and never visible to earlier positions, so one compiled program serves every step.
    """
    ids = np.asarray(input_ids, np.int32).reshape(1, -1)
    n = ids.shape[1]
    total = n + max_new_tokens
    buf = np.zeros((1, total), np.int32)
    buf[0, :n] = ids[0]
    pix = None if pixel_values is None or not len(pixel_values) else jnp.asarray(pixel_values, jnp.float32)
    embeds = model.apply(params, jnp.asarray(ids), pix, images=images, method=SailVL.embed)  # image features once
    embeds = jnp.pad(embeds, ((0, 0), (0, max_new_tokens), (0, 0)))

    @jax.jit
    def step(embeds, length):
        seg = (jnp.arange(total) < length).astype(jnp.int32)[None]
        out = model.apply(params, None, inputs_embeds=embeds, segment_ids=seg, return_hidden=True,
                          method=lambda m, _, **kw: m.language_model(**kw))
        h = jax.lax.dynamic_slice_in_dim(out.hidden, length - 1, 1, axis=1)
        return model.apply(params, h, method=SailVL.logits)[0, 0].astype(jnp.float32)

    embed_token = jax.jit(lambda t: model.apply(params, t, method=lambda m, t: m.language_model.embed(t)))
    new: list[int] = []
    step_logits = []
    for i in range(max_new_tokens):
        logits = step(embeds, jnp.int32(n + i))
        step_logits.append(np.asarray(logits))
        tok = int(jnp.argmax(logits))
        new.append(tok)
        if eos_token_id is not None and tok == eos_token_id:
            break
        e = embed_token(jnp.asarray([[tok]], jnp.int32))
        embeds = jax.lax.dynamic_update_slice(embeds, e.astype(embeds.dtype), (0, n + i, 0))
    return new, np.stack(step_logits)
