"""SailVL: SAIL-ViT + PixelShuffleAdapter + Qwen3 LLM, with image features scattered into `<IMG_CONTEXT>` slots.

Shapes stay static under jit: `pixel_values` holds a fixed number of tile slots ([T, 3, H, W] or
[B, T_row, 3, H, W]) and `tile_mask` says which slots hold real tiles. The k-th `<IMG_CONTEXT>` token of the
batch (row-major over (row, position)) receives the k-th feature vector of the real tiles in slot order, as
upstream does after dropping tiles with `image_flags == 0`. With a row axis ([B, T_row, ...], the trainer's
batches) the same holds within each row: a row's slots take its own tiles, which is the same result when every
row holds as many slots as its tiles have features, and keeps the gather local to the row's device (a global
gather makes XLA collect every device's features on each one: 55 of the 80 GiB per chip of the 8B SFT step).

With a tile budget (`tile_index` [G, K, 2], the trainer's budgeted batches) `pixel_values` holds only real tiles,
K per group of B/G contiguous rows (one group per data-parallel device), so the ViT runs on G*K tiles, not on every
slot; each tile names its row within the group and its ordinal k within that row, and its features go to that
row's k-th run of `<IMG_CONTEXT>` tokens, gathered within the group (again local to the device).

AnyRes (`images`, a `PackedImages` from `anyres.pack_images`) replaces the tiles: the packed ViT row is
pixel-shuffled per image by a precomputed gather, and the k-th `<IMG_CONTEXT>` token receives the k-th real
LLM token of the packed images (image order, row-major within each image; h*w/4 tokens per image). With as many
packed rows as text rows (the trainer's batches) each text row takes its own packed row's tokens, row-local as
for tiles.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sail_jax.config import LLMConfig, ModelConfig, RuntimeConfig
from sail_jax.layers.common import constrain
from sail_jax.models.adapter import PixelShuffleAdapter
from sail_jax.models.anyres import PackedImages, gather_pixel_shuffle
from sail_jax.models.generative import ImageSlots
from sail_jax.models.qwen3 import LMOutput, Qwen3ForCausalLM
from sail_jax.models.sail_vit import SailViT, ViTOutput


def scatter_image_features(
    embeds: jax.Array, input_ids: jax.Array, features: jax.Array, feature_mask: jax.Array, context_id: int
) -> jax.Array:
    """Write `features` [F, D] (rows with `feature_mask` [F] in order) into the `context_id` slots of `embeds`.

    Extra context slots beyond the available features keep their text embedding (the data pipeline and the
    processor guarantee equal counts; the engine checks them).
    """
    b, t, d = embeds.shape
    flat = embeds.reshape(b * t, d)
    is_ctx = input_ids.reshape(-1) == context_id
    ordinal = jnp.cumsum(is_ctx) - 1
    n_feat = features.shape[0]
    (valid_rows,) = jnp.nonzero(feature_mask, size=n_feat, fill_value=0)
    n_valid = jnp.sum(feature_mask)
    take = is_ctx & (ordinal < n_valid)
    rows = valid_rows[jnp.clip(ordinal, 0, n_feat - 1)]
    out = jnp.where(take[:, None], features[rows].astype(flat.dtype), flat)
    return out.reshape(b, t, d)


def scatter_rows(embeds: jax.Array, input_ids: jax.Array, features: jax.Array, feature_mask: jax.Array,
                 context_id: int) -> jax.Array:
    """`scatter_image_features` row by row: row b's features [B, F, D] (mask [B, F]) fill only row b's context slots,
    so the ordinal of a slot never depends on the rows before it (row-local under batch sharding)."""
    one_row = lambda e, ids, f, m: scatter_image_features(e[None], ids[None], f, m, context_id)[0]
    return jax.vmap(one_row)(embeds, input_ids, features, feature_mask)


def scatter_tile_features(
    embeds: jax.Array, input_ids: jax.Array, features: jax.Array, tile_index: jax.Array, context_id: int
) -> jax.Array:
    """Write tile features [G*K, n, D] into `embeds` [B, T, D]: tile (g, j) with `tile_index[g, j]` = (row r, k)
    fills the k-th n-token run of `context_id` tokens of row g*(B/G) + r (row -1: an empty slot). Context tokens
    without a tile keep their text embedding, as in `scatter_image_features`."""
    groups, budget = tile_index.shape[:2]
    b, t, d = embeds.shape
    if b % groups or features.shape[0] != groups * budget:
        raise ValueError(f"{groups} tile groups of {budget} do not match {b} rows and {features.shape[0]} tiles")
    n, rows = features.shape[1], b // groups
    runs = -(-t // n)  # most tile runs a row can hold

    def group(e, ids, f, index):  # [r, T, D], [r, T], [K, n, D], [K, 2]
        is_ctx = ids == context_id
        ordinal = jnp.cumsum(is_ctx, axis=1) - 1
        row = jnp.where(index[:, 0] >= 0, index[:, 0], rows)  # empty slots: out of range, dropped
        table = jnp.full((rows, runs), -1, jnp.int32).at[row, index[:, 1]].set(
            jnp.arange(budget, dtype=jnp.int32), mode="drop")
        tile = jnp.take_along_axis(table, jnp.clip(ordinal // n, 0, runs - 1), axis=1)  # [r, T]
        vals = f[jnp.maximum(tile, 0), ordinal % n]
        return jnp.where((is_ctx & (tile >= 0))[..., None], vals.astype(e.dtype), e)

    # Pin the group axis to the data-parallel devices, so each group's gather runs on the device holding its rows.
    grouped = ("activation_batch", None, "activation_length", "activation_embed")
    split = lambda x: x.reshape(groups, -1, *x.shape[1:])
    e = constrain(split(embeds), grouped)
    f = constrain(split(features), ("activation_tiles", None, None, "activation_embed"))
    out = constrain(jax.vmap(group)(e, split(input_ids), f, tile_index), grouped)
    return constrain(out.reshape(b, t, d), ("activation_batch", "activation_length", "activation_embed"))


def dummy_inputs(cfg: ModelConfig, batch: int = 1, seq: int = 8) -> tuple[jax.Array, jax.Array]:
    """Inputs that touch every parameter: token ids and one tile of pixels."""
    v = cfg.vision
    return (
        jnp.zeros((batch, seq), jnp.int32),
        jnp.zeros((1, v.num_channels, v.image_size, v.image_size), jnp.float32),
    )


class SailVL(nn.Module):
    """The whole SAIL-VL2 model. Sub-module names match the upstream prefixes."""

    cfg: ModelConfig

    def setup(self):
        cfg, rt = self.cfg, self.cfg.runtime
        self.vision_model = SailViT(cfg.vision, rt, cfg.select_layer)
        self.mlp1 = PixelShuffleAdapter(cfg.adapter, cfg.llm.hidden_size, rt)
        self.language_model = Qwen3ForCausalLM(cfg.llm, rt)

    @property
    def llm_config(self) -> LLMConfig:
        return self.cfg.llm

    @property
    def runtime(self) -> RuntimeConfig:
        return self.cfg.runtime

    @property
    def image_slots(self) -> ImageSlots:
        v = self.cfg.vision
        return ImageSlots(self.cfg.img_context_token_id, self.cfg.tokens_per_tile, v if v.anyres else None)

    def dummy_inputs(self) -> tuple[jax.Array, jax.Array]:
        return dummy_inputs(self.cfg)

    def vision(self, pixel_values: jax.Array, return_hidden_states: bool = False) -> ViTOutput:
        return self.vision_model(pixel_values, return_hidden_states=return_hidden_states)

    def extract_feature(self, pixel_values: jax.Array) -> jax.Array:
        """[T, 3, H, W] tiles -> [T, tokens_per_tile, D] LLM-space features (upstream `extract_feature`)."""
        g = self.cfg.vision.grid_size
        return self.mlp1(self.vision(pixel_values).selected, (g, g))

    def extract_feature_packed(self, images: PackedImages) -> tuple[jax.Array, jax.Array]:
        """Packed AnyRes images -> (features [B*L/s^2, D], validity mask [B*L/s^2]) in image order."""
        s2 = self.mlp1.scale**2
        if images.shuffle_index.shape[-1] != s2:
            raise ValueError(
                f"packed images were shuffled for {images.shuffle_index.shape[-1]} patches per token; "
                f"this model's downsample_ratio needs {s2} (pack_images scale={self.mlp1.scale})"
            )
        x = self.vision_model.anyres(images).selected
        feats = self.mlp1.project(gather_pixel_shuffle(x, images.shuffle_index))
        return feats.reshape(-1, feats.shape[-1]), images.token_mask.reshape(-1)

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        tile_mask: jax.Array | None = None,
        images: PackedImages | None = None,
        tile_index: jax.Array | None = None,
    ) -> jax.Array:
        """Token embeddings with image features (fixed tiles, budgeted tiles with `tile_index`, or packed AnyRes
        images) in `<IMG_CONTEXT>` slots."""
        embeds = self.language_model.embed(input_ids)
        if images is not None:
            if pixel_values is not None:
                raise ValueError("pass either pixel_values (fixed tiles) or images (AnyRes), not both")
            feats, mask = self.extract_feature_packed(images)
            rows, ctx = images.patches.shape[0], self.cfg.img_context_token_id
            if rows > 1 and rows == input_ids.shape[0]:  # one packed row per text row (training): row-local
                feats, mask = feats.reshape(rows, -1, feats.shape[-1]), mask.reshape(rows, -1)
                return scatter_rows(embeds, input_ids, feats, mask, ctx)
            return scatter_image_features(embeds, input_ids, feats, mask, ctx)
        if pixel_values is None:
            return embeds
        if tile_index is not None:  # [G*K, 3, H, W]: only the budgeted tiles run through the ViT
            feats = self.extract_feature(pixel_values)
            return scatter_tile_features(embeds, input_ids, feats, tile_index, self.cfg.img_context_token_id)
        tiles = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        if tile_mask is None:
            tile_mask = jnp.ones(tiles.shape[0], bool)
        feats = self.extract_feature(tiles)  # [T, n, D]
        n, ctx = feats.shape[1], self.cfg.img_context_token_id
        if pixel_values.ndim == 5:  # [B, T_row, ...]: row-local
            rows = input_ids.shape[0]
            if pixel_values.shape[0] != rows:
                raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows of tile slots; input_ids has {rows}")
            feats = feats.reshape(rows, -1, feats.shape[-1])
            mask = jnp.repeat(tile_mask.reshape(rows, -1), n, axis=1)
            return scatter_rows(embeds, input_ids, feats, mask, ctx)
        return scatter_image_features(embeds, input_ids, feats.reshape(-1, feats.shape[-1]),
                                      jnp.repeat(tile_mask.reshape(-1), n), ctx)

    def embed_prompt(
        self, input_ids: jax.Array, features: jax.Array | None = None, feature_mask: jax.Array | None = None
    ) -> jax.Array:
        """`GenerativeModel.embed_prompt`: features (from `extract_feature`) scattered into the context slots."""
        embeds = self.language_model.embed(input_ids)
        if features is None:
            return embeds
        return scatter_image_features(embeds, input_ids, features, feature_mask, self.cfg.img_context_token_id)

    def last_logits(
        self, embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        return self.language_model.last_logits(embeds, positions, segment_ids, cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_model.logits(hidden)

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        tile_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict[str, jax.Array] | None = None,
        return_hidden: bool = False,
        images: PackedImages | None = None,
        tile_index: jax.Array | None = None,
    ) -> LMOutput:
        embeds = self.embed(input_ids, pixel_values, tile_mask, images, tile_index)
        return self.language_model(
            inputs_embeds=embeds, positions=positions, segment_ids=segment_ids, cache=cache,
            return_hidden=return_hidden,
        )
