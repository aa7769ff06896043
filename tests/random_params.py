"""Random parameter trees drawn on the host: `jax.jit(model.init)` compiles one threefry kernel per parameter
shape, which costs tens of seconds on the shared CPU, while numpy fills an `eval_shape` tree instantly."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def random_params(model: nn.Module, *args: Any, seed: int = 0, std: float = 0.02, **kwargs: Any) -> dict:
    """`{"params": ...}` shaped like `model.init(rng, *args)`: norm scales 1 + 0.1*N(0,1) (non-trivial on
    purpose), every other leaf std*N(0,1); float32 device arrays."""
    abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        is_scale = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(1 + 0.1 * x if is_scale else std * x)

    return {"params": jax.tree_util.tree_map_with_path(draw, abstract["params"])}
