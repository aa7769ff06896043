"""SwiGLU feed-forward block (Qwen3 `gate_proj`/`up_proj`/`down_proj`)."""

from __future__ import annotations

import flax.linen as nn
import jax

from sail_jax.layers.common import DType, constrain, dense


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); names follow the HF Qwen3 keys so converters map 1:1."""

    hidden_size: int
    intermediate_size: int
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    gate_name: str = "gate_proj"
    up_name: str = "up_proj"
    down_name: str = "down_proj"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(self.intermediate_size, ("embed", "mlp"), name=self.gate_name, **kw)(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), name=self.up_name, **kw)(x)
        h = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(self.hidden_size, ("mlp", "embed"), name=self.down_name, **kw)(h)
