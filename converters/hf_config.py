"""config.json, both ways: the upstream SAIL-VL2 schema (read by the original remote code) and plain transformers
Qwen3 / Qwen3-MoE configs (for `export-llm`), written from and read into our ModelConfig in this one module, so the
key names live in one place.

The upstream layout follows the released 2B config.json field by field (as kept in tests/data/sailvl2-tiny), with
the values that describe the model taken from our ModelConfig. Two deliberate differences from the release:
`attn_implementation` is "eager" (the released "sdpa" makes the original Qwen3 code install an NPU-only kernel),
and `tie_word_embeddings` is false, because we always store `language_model.lm_head.weight` and the original code loads
a stored lm_head untied (the released 2B says true yet stores one); a reader that honoured `true` would silently
drop it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sail_jax.config import (
    IMG_CONTEXT_TOKEN_ID,
    PAD_TOKEN_ID,
    AdapterConfig,
    ConfigError,
    LLMConfig,
    ModelConfig,
    MoEConfig,
    RuntimeConfig,
    VisionConfig,
)

BOS_TOKEN_ID = 151643
EOS_TOKEN_ID = 151645
UPSTREAM_TRANSFORMERS_VERSION = "4.51.0"

# The generic PretrainedConfig fields transformers 4.51 writes into every (sub-)config, as in the release.
_PRETRAINED_FIELDS: dict[str, Any] = {
    "_name_or_path": "", "add_cross_attention": False, "bad_words_ids": None, "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None, "finetuning_task": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0,
    "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
    "suppress_tokens": None, "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False,
    "tie_encoder_decoder": False, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torchscript": False,
    "transformers_version": UPSTREAM_TRANSFORMERS_VERSION, "typical_p": 1.0, "use_bfloat16": False,
}


def _moe_fields(llm: LLMConfig) -> dict[str, Any]:
    m = llm.moe
    assert m is not None
    return {
        "decoder_sparse_step": m.decoder_sparse_step, "mlp_only_layers": list(m.mlp_only_layers),
        "moe_intermediate_size": m.moe_intermediate_size, "norm_topk_prob": m.norm_topk_prob,
        "num_experts": m.num_experts, "num_experts_per_tok": m.num_experts_per_tok, "output_router_logits": False,
        "router_aux_loss_coef": m.router_aux_loss_coef,
    }


def _qwen3_fields(llm: LLMConfig) -> dict[str, Any]:
    """The architecture fields shared by both schemas."""
    out = {
        "architectures": ["Qwen3MoeForCausalLM" if llm.moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if llm.moe else "qwen3",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID, "head_dim": llm.head_dim, "hidden_act": "silu", "hidden_size": llm.hidden_size,
        "initializer_range": 0.02, "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings, "max_window_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads, "num_hidden_layers": llm.num_layers,
        "num_key_value_heads": llm.num_kv_heads, "rms_norm_eps": llm.rms_norm_eps, "rope_scaling": None,
        "rope_theta": _number(llm.rope_theta), "sliding_window": None, "tie_word_embeddings": False,
        "use_cache": True, "use_sliding_window": False, "vocab_size": llm.vocab_size,
    }
    if llm.moe:
        out.update(_moe_fields(llm))
    return out


def _number(x: float) -> int | float:
    """1000000.0 -> 1000000, as the released files spell integral values."""
    return int(x) if float(x).is_integer() else x


def sailvl_config_dict(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """config.json for an upstream SAIL-VL2 directory holding `cfg` stored as `dtype`."""
    v = cfg.vision
    llm = {**_PRETRAINED_FIELDS, **_qwen3_fields(cfg.llm), "attn_implementation": "eager", "torch_dtype": dtype}
    vision = {
        **_PRETRAINED_FIELDS,
        "architectures": ["SAILViTModel"],
        "auto_map": {"AutoConfig": "configuration_sailvit.SAILViTConfig",
                     "AutoModel": "modeling_sailvit.SAILViTModel"},
        "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "hidden_size": v.hidden_size, "image_size": v.image_size, "intermediate_size": v.intermediate_size,
        "model_type": "sailvit", "num_attention_heads": v.num_heads, "num_channels": v.num_channels,
        "num_hidden_layers": v.num_layers, "patch_size": v.patch_size, "projection_dropout": 0.0,
        "qkv_bias": v.qkv_bias, "rms_norm_eps": v.rms_norm_eps, "tie_word_embeddings": True, "torch_dtype": dtype,
        "use_bias": v.use_bias,
    }
    top = {
        "_commit_hash": None,
        "architectures": ["SAILVLModel"],
        "auto_map": {"AutoConfig": "configuration_sailvl.SAILVLConfig", "AutoModel": "modeling_sailvl.SAILVLModel",
                     "AutoModelForCausalLM": "modeling_sailvl.SAILVLModel"},
        "downsample_ratio": cfg.adapter.downsample_ratio, "dynamic_image_size": True,
        "force_image_size": v.image_size, "llm_config": dict(sorted(llm.items())),
        "max_dynamic_patch": cfg.max_dynamic_patch, "min_dynamic_patch": cfg.min_dynamic_patch,
        "model_type": "sailvl", "pad2square": False, "ps_version": cfg.adapter.ps_version,
        "select_layer": cfg.select_layer, "template": cfg.template, "torch_dtype": dtype,
        "transformers_version": None, "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": cfg.use_thumbnail,
        "vision_config": dict(sorted(vision.items())),
    }
    if cfg.img_context_token_id != IMG_CONTEXT_TOKEN_ID:  # the original code hard-codes the release's id
        top["img_context_token_id"] = cfg.img_context_token_id
    return top


def generation_config_dict() -> dict[str, Any]:
    """The released generation_config.json (it carries no generation settings)."""
    return {"_from_model_config": True, "transformers_version": UPSTREAM_TRANSFORMERS_VERSION}


def llm_generation_config_dict() -> dict[str, Any]:
    """generation_config.json of an exported LLM: the ids SAIL-VL2 generates with (eos = <|im_end|>)."""
    return {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID,
            "do_sample": False}


def transformers_llm_config_dict(llm: LLMConfig, dtype: str) -> dict[str, Any]:
    """config.json of a plain transformers Qwen3 / Qwen3-MoE model.

    transformers v5 reads RoPE from `rope_parameters`; the top-level `rope_theta` keeps v4 readers working.
    `num_experts` is the v4 name, which v5 maps onto `num_local_experts`.
    """
    out = _qwen3_fields(llm)
    del out["rope_scaling"]
    out.update({
        "rope_parameters": {"rope_theta": _number(llm.rope_theta), "rope_type": "default"},
        "layer_types": ["full_attention"] * llm.num_layers,
        "dtype": dtype,
        "torch_dtype": dtype,
    })
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------------
# Reading


# Numeric fields of the configs we read: a value of another type is refused naming its key (not with int()'s
# "invalid literal ... 'two'").
NUMERIC_KEYS = frozenset((
    "hidden_size", "num_attention_heads", "num_experts", "num_local_experts", "num_experts_per_tok",
    "moe_intermediate_size", "decoder_sparse_step", "router_aux_loss_coef", "vocab_size", "intermediate_size",
    "num_hidden_layers", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "rope_theta",
    "image_size", "patch_size", "num_channels", "force_image_size", "downsample_ratio", "select_layer",
    "max_dynamic_patch", "min_dynamic_patch",
))


def _check_numbers(d: Any, where: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    for key in NUMERIC_KEYS & d.keys():
        v = d[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{where}: key {key!r} must be a number, got {v!r}")


def _need(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: missing key {key!r}")
    return d[key]


def _rope_theta(d: dict) -> float:
    if "rope_theta" in d:
        return float(d["rope_theta"])
    params = d.get("rope_parameters") or {}
    return float(params.get("rope_theta", 1e6))


def llm_config_from_hf(d: dict, where: str = "llm_config") -> LLMConfig:
    """Qwen3 / Qwen3-MoE `config.json` dict -> LLMConfig (the lm_head is always a separate tensor)."""
    _check_numbers(d, where)
    hidden = int(_need(d, "hidden_size", where))
    heads = int(_need(d, "num_attention_heads", where))
    moe = None
    # Qwen3-MoE checkpoints say num_experts; transformers v5 `to_dict()` / save_pretrained say num_local_experts.
    num_experts = int(d.get("num_experts") or d.get("num_local_experts") or 0)
    if num_experts > 0:
        moe = MoEConfig(
            num_experts=num_experts,
            num_experts_per_tok=int(_need(d, "num_experts_per_tok", where)),
            moe_intermediate_size=int(_need(d, "moe_intermediate_size", where)),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            decoder_sparse_step=int(d.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
            router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
        )
    return LLMConfig(
        vocab_size=int(_need(d, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(d.get("intermediate_size", 4 * hidden)),
        num_layers=int(_need(d, "num_hidden_layers", where)),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        rope_theta=_rope_theta(d),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        # The original code loads a stored lm_head untied even under tie_word_embeddings=true (the released 2B);
        # plain Qwen3 exports honour tying only if no lm_head is stored, which the loaders decide from the weights.
        tie_word_embeddings=False,
        max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
        moe=moe,
    )


def vision_config_from_hf(d: dict, where: str = "vision_config") -> VisionConfig:
    """SAIL-ViT `vision_config` dict -> VisionConfig."""
    _check_numbers(d, where)
    return VisionConfig(
        hidden_size=int(_need(d, "hidden_size", where)),
        intermediate_size=int(_need(d, "intermediate_size", where)),
        num_layers=int(_need(d, "num_hidden_layers", where)),
        num_heads=int(_need(d, "num_attention_heads", where)),
        image_size=int(d.get("image_size", 448)),
        patch_size=int(d.get("patch_size", 14)),
        num_channels=int(d.get("num_channels", 3)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(d.get("qkv_bias", False)),
        use_bias=bool(d.get("use_bias", False)),
    )


def from_hf_config(path: str | Path, runtime: RuntimeConfig | None = None) -> ModelConfig:
    """Read an upstream SAIL-VL2 (or plain Qwen3 / Qwen3-MoE) `config.json`, file or directory, into a ModelConfig."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
    _check_numbers(d, str(p))
    model_type = d.get("model_type")
    if model_type in ("qwen3", "qwen3_moe"):  # a plain language-model export
        return ModelConfig(llm=llm_config_from_hf(d, str(p)), runtime=runtime or RuntimeConfig())
    if model_type != "sailvl":
        raise ConfigError(f"{p}: model_type={model_type!r}; expected 'sailvl', 'qwen3' or 'qwen3_moe'")
    ps_version = d.get("ps_version", "v1")
    if ps_version != "v2":
        raise ConfigError(f"{p}: ps_version={ps_version!r} is not supported (released checkpoints use 'v2')")
    force = d.get("force_image_size")
    vision = vision_config_from_hf(_need(d, "vision_config", str(p)), f"{p}: vision_config")
    if force and int(force) != vision.image_size:
        vision = dataclasses.replace(vision, image_size=int(force))
    return ModelConfig(
        vision=vision,
        adapter=AdapterConfig(downsample_ratio=float(d.get("downsample_ratio", 0.5)), ps_version=ps_version),
        llm=llm_config_from_hf(_need(d, "llm_config", str(p)), f"{p}: llm_config"),
        runtime=runtime or RuntimeConfig(),
        # The upstream config class defaults to -4, but the releases set it (-1); read it, never assume.
        select_layer=int(d.get("select_layer", -4)),
        max_dynamic_patch=int(d.get("max_dynamic_patch", 12)),
        min_dynamic_patch=int(d.get("min_dynamic_patch", 1)),
        use_thumbnail=bool(d.get("use_thumbnail", True)),
        template=str(d.get("template", "univl-chat")),
        img_context_token_id=int(d.get("img_context_token_id", IMG_CONTEXT_TOKEN_ID)),
    )
