"""PixelShuffleAdapter (upstream `mlp1`): 2x2 pixel shuffle -> LayerNorm -> Linear -> GELU(erf) -> Linear."""

from __future__ import annotations

import flax.linen as nn
import jax

from sail_jax.config import AdapterConfig, RuntimeConfig
from sail_jax.layers.common import Dense
from sail_jax.layers.norms import LayerNorm


def pixel_shuffle(x: jax.Array, h: int, w: int, scale: int = 2) -> jax.Array:
    """[T, h*w, C] (row-major grid) -> [T, (h/s)*(w/s), s*s*C] as upstream `ps_version="v2"`.

    Output token (i, j) concatenates patches (si+dy, sj+dx) for dy, dx in row-major order; channel index is
    (dy*s + dx)*C + c; output tokens stay row-major.
    """
    t, n, c = x.shape
    if n != h * w or h % scale or w % scale:
        raise ValueError(f"pixel_shuffle: {n} tokens do not form a {h}x{w} grid divisible by {scale}")
    y = x.reshape(t, h // scale, scale, w // scale, scale, c).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(t, (h // scale) * (w // scale), scale * scale * c)


class PixelShuffleAdapter(nn.Module):
    """Param names follow HF InternVL's projector: layer_norm [mlp1.0], linear_1 [mlp1.1], linear_2 [mlp1.3]."""

    cfg: AdapterConfig
    out_features: int
    rt: RuntimeConfig = RuntimeConfig()

    @property
    def scale(self) -> int:
        s = round(1 / self.cfg.downsample_ratio)
        if abs(s * self.cfg.downsample_ratio - 1) > 1e-6:
            raise ValueError(f"downsample_ratio={self.cfg.downsample_ratio} is not 1/integer")
        return s

    def setup(self):
        rt = self.rt
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype)
        self.layer_norm = LayerNorm(self.cfg.layer_norm_eps, **kw)
        self.linear_1 = Dense((self.out_features,), ("mlp", "embed"), use_bias=True, init_std=self.cfg.init_std, **kw)
        self.linear_2 = Dense((self.out_features,), ("mlp", "embed"), use_bias=True, init_std=self.cfg.init_std, **kw)

    def project(self, y: jax.Array) -> jax.Array:
        """Already pixel-shuffled tokens [..., s^2*C] -> [..., out_features] (AnyRes shuffles by gather)."""
        y = self.linear_1(self.layer_norm(y))
        return self.linear_2(nn.gelu(y, approximate=False))

    def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """x [T, h*w, C] ViT features on an (h, w) patch grid -> [T, h*w/s^2, out_features]."""
        return self.project(pixel_shuffle(x, grid[0], grid[1], self.scale))
