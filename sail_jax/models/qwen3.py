"""Qwen3 / Qwen3-MoE causal language model (flax linen), numerically matching transformers' Qwen3.

Param tree (unscanned): embed_tokens/embedding [V,D]; layers_{i}/{input_layernorm, self_attn/{q,k,v,o}_proj,
self_attn/{q,k}_norm, post_attention_layernorm, mlp/...}; norm/scale; lm_head/kernel [D,V] (absent if tied).
With `scan_layers` the per-layer subtrees are stacked under `layers/` with a leading layer axis.

The KV cache is explicit data, not a flax collection: {"k","v": [L,B,S,Hkv,hd], "segment_ids": [B,S],
"index": int32 scalar}; a call with a cache writes its keys/values at `index` and returns the new cache.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sail_jax.config import LLMConfig, RuntimeConfig
from sail_jax.layers.attention import dot_product_attention
from sail_jax.layers.common import as_dtype, constrain, dense, remat_module
from sail_jax.layers.mlp import SwiGLU
from sail_jax.layers.norms import RMSNorm
from sail_jax.layers.rope import apply_rope, rope_cos_sin

ACT = ("activation_batch", "activation_length", "activation_embed")


@flax.struct.dataclass
class LMOutput:
    """`logits` [B,T,V] (None when `return_hidden`), final-norm `hidden` [B,T,D], MoE `aux` per layer, cache."""

    logits: jax.Array | None
    hidden: jax.Array
    aux: dict[str, jax.Array]
    cache: dict[str, jax.Array] | None


class Qwen3Attention(nn.Module):
    cfg: LLMConfig
    rt: RuntimeConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv=None, kv_segment_ids=None, cache_index=None):
        c, rt = self.cfg, self.rt
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype)
        q = dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), name="q_proj", **kw)(x)
        k = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x)
        v = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x)
        q = RMSNorm(c.rms_norm_eps, axis_name="head_dim", name="q_norm", **kw)(q)
        k = RMSNorm(c.rms_norm_eps, axis_name="head_dim", name="k_norm", **kw)(k)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        kv_axes = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
        k, v = constrain(k, kv_axes), constrain(v, kv_axes)

        new_kv = None
        if kv is None:
            o = dot_product_attention(
                q, k, v, segment_ids=segment_ids, causal=True, impl=rt.attention_impl,
                q_chunk=rt.attention_q_chunk,
            )
        else:
            ck, cv = kv
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            b, t = x.shape[:2]
            q_idx = cache_index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            o = dot_product_attention(
                q, ck.astype(q.dtype), cv.astype(q.dtype), segment_ids=segment_ids,
                kv_segment_ids=kv_segment_ids, q_indices=q_idx,
                kv_indices=jnp.broadcast_to(jnp.arange(ck.shape[1], dtype=jnp.int32), kv_segment_ids.shape),
                causal=True, q_chunk=rt.attention_q_chunk,
            )
            new_kv = (ck, cv)
        o = constrain(o, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        out = dense(c.hidden_size, ("heads", "head_dim", "embed"), in_axis=(-2, -1), name="o_proj", **kw)(o)
        return out, new_kv


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm block. Returns (x, (aux, new_kv)) so the same module works under `nn.scan`."""

    cfg: LLMConfig
    rt: RuntimeConfig
    is_moe: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv=None, kv_segment_ids=None, cache_index=None):
        c, rt = self.cfg, self.rt
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype)
        x = constrain(x, ACT)
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        attn, new_kv = Qwen3Attention(c, rt, name="self_attn")(
            h, positions, segment_ids, kv, kv_segment_ids, cache_index
        )
        x = x + attn
        h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        aux: dict[str, jax.Array] = {}
        if self.is_moe:
            from sail_jax.layers.moe import MoEBlock

            y, aux = MoEBlock(c, rt, name="mlp")(h, segment_ids != 0)
        else:
            y = SwiGLU(c.hidden_size, c.intermediate_size, name="mlp", **kw)(h)
        x = constrain(x + y, ACT)
        return x, (aux, new_kv)


def _check_scannable(cfg: LLMConfig) -> None:
    kinds = {cfg.is_moe_layer(i) for i in range(cfg.num_layers)}
    if len(kinds) > 1:
        raise ValueError(
            "scan_layers needs every layer of one kind; this config mixes dense and MoE layers "
            "(mlp_only_layers / decoder_sparse_step). Run it with scan_layers=False."
        )


class Qwen3ForCausalLM(nn.Module):
    """Token embedding -> decoder layers -> final RMSNorm -> lm_head (or the tied embedding)."""

    cfg: LLMConfig
    rt: RuntimeConfig = RuntimeConfig()

    def setup(self):
        c, rt = self.cfg, self.rt
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=as_dtype(rt.dtype),
            param_dtype=as_dtype(rt.param_dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        layer_cls = remat_module(Qwen3DecoderLayer, rt.remat_policy)
        if rt.scan_layers:
            _check_scannable(c)
            self.layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, rt, c.is_moe_layer(0))
        else:
            self.layers = [layer_cls(c, rt, c.is_moe_layer(i)) for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, dtype=rt.dtype, param_dtype=rt.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = dense(
                c.vocab_size, ("embed", "vocab"), name="lm_head", dtype=rt.dtype, param_dtype=rt.param_dtype
            )

    @property
    def llm_config(self) -> LLMConfig:
        return self.cfg

    @property
    def runtime(self) -> RuntimeConfig:
        return self.rt

    @property
    def image_slots(self) -> None:
        return None

    def dummy_inputs(self) -> tuple[jax.Array]:
        return (jnp.zeros((1, 8), jnp.int32),)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def embed_prompt(
        self, input_ids: jax.Array, features: jax.Array | None = None, feature_mask: jax.Array | None = None
    ) -> jax.Array:
        """`GenerativeModel.embed_prompt` of a text-only model."""
        if features is not None:
            raise ValueError("a text-only language model takes no image features")
        return self.embed(input_ids)

    def last_logits(
        self, embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`GenerativeModel.last_logits`: float32 logits of the last column and the new cache."""
        out = self(inputs_embeds=embeds, positions=positions, segment_ids=segment_ids, cache=cache,
                   return_hidden=True)
        return self.logits(out.hidden[:, -1]).astype(jnp.float32), out.cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """lm_head applied to final-norm hidden states (any leading shape)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def _run_layers(self, x, positions, segment_ids, cache):
        kv_seg = idx = None
        if cache is not None:
            idx = cache["index"]
            kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, idx))
        if self.rt.scan_layers:
            kv = None if cache is None else (cache["k"], cache["v"])
            x, (aux, new_kv) = self.layers(x, positions, segment_ids, kv, kv_seg, idx)
        else:
            auxes, ks, vs = [], [], []
            for i, layer in enumerate(self.layers):
                kv = None if cache is None else (cache["k"][i], cache["v"][i])
                x, (aux_i, kv_i) = layer(x, positions, segment_ids, kv, kv_seg, idx)
                if aux_i:
                    auxes.append(aux_i)
                if kv_i is not None:
                    ks.append(kv_i[0])
                    vs.append(kv_i[1])
            aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes else {}
            new_kv = (jnp.stack(ks), jnp.stack(vs)) if cache is not None else None
        new_cache = None
        if cache is not None:
            new_cache = {"k": new_kv[0], "v": new_kv[1], "segment_ids": kv_seg, "index": idx + x.shape[1]}
        return x, aux, new_cache

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict[str, jax.Array] | None = None,
        return_hidden: bool = False,
    ) -> LMOutput:
        """Packed rows: `segment_ids` [B,T] (0 = padding) and `positions` [B,T] restarting per segment."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed(input_ids)
        b, t = inputs_embeds.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            start = 0 if cache is None else cache["index"]
            positions = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = inputs_embeds.astype(as_dtype(self.rt.dtype))
        x, aux, new_cache = self._run_layers(x, positions, segment_ids, cache)
        hidden = self.norm(x)
        logits = None
        if not return_hidden:
            logits = constrain(self.logits(hidden), ("activation_batch", "activation_length", "activation_vocab"))
        return LMOutput(logits=logits, hidden=hidden, aux=aux, cache=new_cache)


def init_cache(cfg: LLMConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """An empty KV cache for `batch` rows of `max_len` slots (segment id 0 = empty slot)."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }
