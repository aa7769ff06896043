"""SAIL-ViT (AIMv2 architecture): patch conv -> RMSNorm -> + learned positions -> pre-norm blocks -> RMSNorm.

Param tree (upstream key in brackets): patch_proj/{kernel [p,p,C_in,C], bias} [preprocessor.patchifier.proj],
patch_norm [preprocessor.patchifier.norm], pos_embed [N, C] [preprocessor.pos_embed],
blocks_{i}/{norm_1, attn/{qkv [C,3,H,hd], proj [H,hd,C]}, norm_2, mlp/{fc1, fc3, fc2}} [trunk.blocks.{i}]
(stacked under blocks/ when scanned), post_trunk_norm [trunk.post_trunk_norm].

The patch conv (kernel = stride = patch) is computed as a matmul on flattened patches ordered (kh, kw, c), so
fixed-resolution tiles and AnyRes packed patch sequences (`SailViT.anyres`, see models/anyres.py) share one
code path. With `use_2d_rope` both paths add axial 2D RoPE (positions on the 32x32 table grid).
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sail_jax.config import RuntimeConfig, VisionConfig
from sail_jax.layers.attention import dot_product_attention
from sail_jax.layers.common import as_dtype, constrain, dense, remat_module
from sail_jax.layers.mlp import SwiGLU
from sail_jax.layers.norms import RMSNorm
from sail_jax.layers.rope import apply_rope
from sail_jax.models.anyres import PackedImages, axial_rope, grid_rope_positions, interpolate_positions, patchify

ACT = ("activation_tiles", "activation_length", "activation_embed")


@flax.struct.dataclass
class ViTOutput:
    last_hidden_state: jax.Array  # after post_trunk_norm
    selected: jax.Array  # the features the adapter consumes (select_layer semantics)
    hidden_states: tuple[jax.Array, ...] | None  # each block's output (no final norm), when requested


class PatchEmbed(nn.Module):
    cfg: VisionConfig
    rt: RuntimeConfig

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        c, rt = self.cfg, self.rt
        p, ch = c.patch_size, c.num_channels
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("patch", None, None, "embed")),
            (p, p, ch, c.hidden_size),
            as_dtype(rt.param_dtype),
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (c.hidden_size,),
            as_dtype(rt.param_dtype),
        )
        dtype = as_dtype(rt.dtype)
        flat = kernel.reshape(p * p * ch, c.hidden_size).astype(dtype)
        return patches.astype(dtype) @ flat + bias.astype(dtype)


class ViTAttention(nn.Module):
    cfg: VisionConfig
    rt: RuntimeConfig

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array, rope: tuple[jax.Array, jax.Array] | None):
        c, rt = self.cfg, self.rt
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype)
        qkv = dense((3, c.num_heads, c.head_dim), ("embed", "qkv", "heads", "head_dim"), name="qkv",
                    use_bias=c.qkv_bias, **kw)(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = dot_product_attention(q, k, v, segment_ids=segment_ids, causal=False, impl=rt.attention_impl,
                                  q_chunk=rt.attention_q_chunk)
        return dense(c.hidden_size, ("heads", "head_dim", "embed"), in_axis=(-2, -1), name="proj",
                     use_bias=c.use_bias, **kw)(o)


class ViTBlock(nn.Module):
    """x += proj(attn(norm_1(x))); x += fc2(silu(fc1(h)) * fc3(h)), h = norm_2(x). Scan-compatible."""

    cfg: VisionConfig
    rt: RuntimeConfig

    @nn.compact
    def __call__(self, x, segment_ids, rope=None):
        c, rt = self.cfg, self.rt
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype)
        x = constrain(x, ACT)
        x = x + ViTAttention(c, rt, name="attn")(RMSNorm(c.rms_norm_eps, name="norm_1", **kw)(x), segment_ids, rope)
        h = RMSNorm(c.rms_norm_eps, name="norm_2", **kw)(x)
        x = x + SwiGLU(c.hidden_size, c.intermediate_size, gate_name="fc1", up_name="fc3", down_name="fc2",
                       name="mlp", **kw)(h)
        x = constrain(x, ACT)
        return x, x


def sincos_2d_init(grid: int) -> nn.initializers.Initializer:
    """Initial [grid*grid, C] position table: 2D sine-cosine (y in the first half of channels, x in the second).

    Why: upstream initialises the table N(0, 0.02), 2% of the patch-normed tokens, so a model trained from
    scratch barely sees where a patch is; sine-cosine rows are distinct and as large as the tokens from step 0.
    Loaded checkpoints overwrite it. Needs C divisible by 4; other widths fall back to N(0, 0.02).
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        n, c = shape
        if c % 4 or n != grid * grid:
            return nn.initializers.normal(0.02)(key, shape, dtype)
        omega = 1.0 / 10000 ** (jnp.arange(c // 4, dtype=jnp.float32) / (c // 4))
        y, x = jnp.meshgrid(jnp.arange(grid, dtype=jnp.float32), jnp.arange(grid, dtype=jnp.float32), indexing="ij")
        ay, ax = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
        return jnp.concatenate([jnp.sin(ay), jnp.cos(ay), jnp.sin(ax), jnp.cos(ax)], axis=1).astype(dtype)

    return init


class SailViT(nn.Module):
    """Vision tower. `select_layer` = -1: last block + final norm; other values: that block's raw output."""

    cfg: VisionConfig
    rt: RuntimeConfig = RuntimeConfig()
    select_layer: int = -1

    def setup(self):
        c, rt = self.cfg, self.rt
        self.patch_proj = PatchEmbed(c, rt)
        self.patch_norm = RMSNorm(c.rms_norm_eps, dtype=rt.dtype, param_dtype=rt.param_dtype)
        self.pos_embed = self.param(
            "pos_embed",
            nn.with_logical_partitioning(sincos_2d_init(c.grid_size), ("vit_positions", "embed")),
            (c.num_patches, c.hidden_size),
            as_dtype(rt.param_dtype),
        )
        block = remat_module(ViTBlock, rt.remat_policy)
        if rt.scan_layers:
            self.blocks = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, rt)
        else:
            self.blocks = [block(c, rt) for _ in range(c.num_layers)]
        self.post_trunk_norm = RMSNorm(c.rms_norm_eps, dtype=rt.dtype, param_dtype=rt.param_dtype)

    def embed(self, patches: jax.Array, pos: jax.Array | None = None) -> jax.Array:
        """[B, N, p*p*C] patches -> conv + RMSNorm + positions. `pos` overrides the sliced table (AnyRes)."""
        x = self.patch_norm(self.patch_proj(patches))
        if pos is None:
            pos = self.pos_embed[: x.shape[1]][None]
        return x + pos.astype(x.dtype)

    def trunk(
        self, x: jax.Array, segment_ids: jax.Array | None = None, rope=None, return_hidden_states: bool = False
    ) -> ViTOutput:
        n = self.cfg.num_layers
        layer = self.select_layer % n
        if segment_ids is None:
            segment_ids = jnp.ones(x.shape[:2], jnp.int32)
        if self.rt.scan_layers:
            x, stacked = self.blocks(x, segment_ids, rope)
            hidden = tuple(stacked[i] for i in range(n)) if return_hidden_states else None
            selected_raw = stacked[layer]
        else:
            # Every block runs (as upstream): stopping at `select_layer` would leave the later blocks
            # uninitialised (no params to load a checkpoint into) and make last_hidden_state wrong.
            outs = []
            for blk in self.blocks:
                x, _ = blk(x, segment_ids, rope)
                outs.append(x)
            hidden = tuple(outs) if return_hidden_states else None
            selected_raw = outs[layer]
        last = self.post_trunk_norm(x)
        selected = last if self.select_layer == -1 else selected_raw
        return ViTOutput(last_hidden_state=last, selected=selected, hidden_states=hidden)

    def __call__(self, pixel_values: jax.Array, return_hidden_states: bool = False) -> ViTOutput:
        """Fixed resolution: pixel_values [T, C, H, W] (upstream NCHW layout, normalised)."""
        expected = self.cfg.image_size
        if pixel_values.shape[-2:] != (expected, expected):
            raise ValueError(
                f"SailViT expects {expected}x{expected} tiles (the position table is sliced, not "
                f"interpolated); got {pixel_values.shape[-2]}x{pixel_values.shape[-1]}. Use the AnyRes path."
            )
        x = self.embed(patchify(pixel_values, self.cfg.patch_size))
        rope = None
        if self.cfg.use_2d_rope:
            g = self.cfg.grid_size
            rope = self.rope(jnp.asarray(grid_rope_positions(g, g, g))[None])
        return self.trunk(x, rope=rope, return_hidden_states=return_hidden_states)

    def rope(self, rope_pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(cos, sin) [B, N, head_dim] of axial 2D RoPE at `rope_pos` [B, N, 2] (row, col on the table grid)."""
        return axial_rope(rope_pos, self.cfg.head_dim, self.cfg.rope_theta)

    def anyres(self, images: PackedImages, return_hidden_states: bool = False) -> ViTOutput:
        """Packed native-resolution images (`anyres.pack_images`) -> per-patch features [B, L, C].

        Positions are the table bicubically resized to each image's grid; attention stays within each image.
        """
        want = self.cfg.patch_size**2 * self.cfg.num_channels
        if images.patches.shape[-1] != want:
            raise ValueError(f"packed patches have {images.patches.shape[-1]} values; this ViT needs {want}")
        pos = interpolate_positions(self.pos_embed, images.pos_index, images.pos_weight)
        x = self.embed(images.patches, pos)
        rope = self.rope(images.rope_pos) if self.cfg.use_2d_rope else None
        return self.trunk(x, images.segment_ids, rope, return_hidden_states)
