"""Parameter trees without allocation: abstract init, counts, and dummy inputs for any config."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sail_jax.config import ModelConfig
from sail_jax.sharding import count_params


def dummy_inputs(cfg: ModelConfig, batch: int = 1, seq: int = 8) -> tuple[jax.Array, jax.Array]:
    """Inputs that touch every parameter: token ids and one tile of pixels."""
    v = cfg.vision
    return (
        jnp.zeros((batch, seq), jnp.int32),
        jnp.zeros((1, v.num_channels, v.image_size, v.image_size), jnp.float32),
    )


def abstract_model_params(cfg: ModelConfig) -> Any:
    """Boxed ShapeDtypeStruct tree of `SailVL(cfg).init(...)` (no memory, works for 30B models)."""
    from sail_jax.models.sail_vl import SailVL

    ids, pix = dummy_inputs(cfg)
    return jax.eval_shape(lambda: SailVL(cfg).init(jax.random.PRNGKey(0), ids, pix))


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """{'vision': ..., 'adapter': ..., 'llm': ..., 'total': ...} for a model config."""
    params = abstract_model_params(cfg)["params"]
    counts = {
        "vision": count_params(params["vision_model"]),
        "adapter": count_params(params["mlp1"]),
        "llm": count_params(params["language_model"]),
    }
    counts["total"] = sum(counts.values())
    return counts
