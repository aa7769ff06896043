"""Parameter trees without allocation: abstract init and counts for any config (`dummy_inputs` is the model's)."""

from __future__ import annotations

from typing import Any

import jax

from sail_jax.config import ModelConfig
from sail_jax.models.sail_vl import SailVL, dummy_inputs
from sail_jax.sharding import count_params


def abstract_model_params(cfg: ModelConfig) -> Any:
    """Boxed ShapeDtypeStruct tree of `SailVL(cfg).init(...)` (no memory, works for 30B models)."""
    return jax.eval_shape(lambda: SailVL(cfg).init(jax.random.PRNGKey(0), *dummy_inputs(cfg)))


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
