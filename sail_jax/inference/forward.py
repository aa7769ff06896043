"""Full-sequence forward pass that reports logits statistics without holding [N, V] logits at once."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sail_jax.models.anyres import PackedImages
from sail_jax.models.sail_vl import SailVL


def logits_summary(
    model: SailVL, params: dict, hidden: jax.Array, positions: Sequence[int], chunk: int = 512
) -> dict[str, np.ndarray]:
    """Argmax, top-5, log-sum-exp at every position of `hidden` [1,N,D], and full logits at `positions`."""
    n = hidden.shape[1]
    pos = [p % n for p in positions]

    @jax.jit
    def stats(h):
        logits = model.apply(params, h, method=SailVL.logits).astype(jnp.float32)
        top_v, top_i = jax.lax.top_k(logits, 5)
        return jnp.argmax(logits, -1), top_v, top_i, jax.nn.logsumexp(logits, -1)

    parts = []
    for s in range(0, n, chunk):
        h = hidden[:, s : s + chunk]
        if h.shape[1] < chunk:  # keep one compiled shape
            h = jnp.pad(h, ((0, 0), (0, chunk - h.shape[1]), (0, 0)))
        parts.append([np.asarray(x)[:, : min(chunk, n - s)] for x in stats(h)])
    argmax, top_v, top_i, lse = (np.concatenate(p, axis=1) for p in zip(*parts))
    at = np.asarray(model.apply(params, hidden[0, jnp.asarray(pos, jnp.int32)], method=SailVL.logits), np.float32)
    return {
        "logits_argmax": argmax.astype(np.int64),
        "logits_top5_values": top_v.astype(np.float32),
        "logits_top5_indices": top_i.astype(np.int64),
        "logits_logsumexp": lse.astype(np.float32),
        "logits_at": at,
        "logits_at_positions": np.asarray(pos, np.int64),
    }


def forward_outputs(
    model: SailVL,
    params: dict,
    input_ids: np.ndarray,
    pixel_values: np.ndarray | None,
    positions: Sequence[int] | None = None,
    images: PackedImages | None = None,
) -> dict[str, np.ndarray]:
    """The arrays `sail-jax forward` writes, named as in the fixture's outputs.npz. With AnyRes `images` (one packed
    row) instead of tiles: the packed ViT output [1, L, C] and the real adapter tokens [F, D]."""
    ids = jnp.asarray(input_ids, jnp.int32)
    out: dict[str, np.ndarray] = {}
    vision: dict = {}
    if images is not None:
        anyres_vit = lambda m, x: m.vision_model.anyres(x)
        vit = jax.jit(lambda p, x: model.apply(p, x, method=anyres_vit))(params, images)
        out["vit_last_hidden_state"] = np.asarray(vit.last_hidden_state, np.float32)
        feats, mask = jax.jit(lambda p, x: model.apply(p, x, method=SailVL.extract_feature_packed))(params, images)
        out["adapter_output"] = np.asarray(feats, np.float32)[np.asarray(mask)]
        vision = {"images": images}
    elif pixel_values is not None and len(pixel_values):
        pix = jnp.asarray(pixel_values, jnp.float32)
        vit = jax.jit(lambda p, x: model.apply(p, x, method=SailVL.vision))(params, pix)
        out["vit_last_hidden_state"] = np.asarray(vit.last_hidden_state, np.float32)
        feats = jax.jit(lambda p, x: model.apply(p, x, method=SailVL.extract_feature))(params, pix)
        out["adapter_output"] = np.asarray(feats, np.float32)
        vision = {"pixel_values": pix}
    embeds = jax.jit(lambda p, i, v: model.apply(p, i, method=SailVL.embed, **v))(params, ids, vision)
    out["inputs_embeds"] = np.asarray(embeds, np.float32)
    hidden = jax.jit(lambda p, i, v: model.apply(p, i, return_hidden=True, **v).hidden)(params, ids, vision)
    positions = list(positions) if positions is not None else [-4, -3, -2, -1]
    out.update(logits_summary(model, params, hidden, positions))
    return out
