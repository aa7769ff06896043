"""Helpers that build tiny transformers reference models and load their weights into sail-jax params."""

from __future__ import annotations

import numpy as np
import torch

from converters.core import import_params
from converters.mapping import llm_entries, model_entries
from sail_jax.config import LLMConfig, ModelConfig


def llm_config_from_torch(hf_cfg) -> LLMConfig:
    from converters.hf_config import llm_config_from_hf

    return llm_config_from_hf(hf_cfg.to_dict())


def torch_llm_params(model: torch.nn.Module, cfg: LLMConfig, abstract_params, scanned: bool) -> dict:
    """transformers Qwen3(Moe)ForCausalLM weights -> our unboxed `params` tree (numpy, float32)."""
    from transformers.core_model_loading import revert_weight_conversion

    # The on-disk key names: transformers v5 fuses Qwen3-MoE experts in memory but saves them per expert.
    on_disk = revert_weight_conversion(model, dict(model.state_dict()))
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in on_disk.items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return import_params(llm_entries(cfg, scanned), sd.__getitem__, abstract_params, available_keys=sd.keys())


AIMV2_TO_SAIL = {  # transformers Aimv2VisionModel -> upstream SAIL-ViT names , per block under {i}
    "embeddings.patch_embed.weight": "preprocessor.patchifier.proj.weight",
    "embeddings.patch_embed.bias": "preprocessor.patchifier.proj.bias",
    "embeddings.rms_norm.weight": "preprocessor.patchifier.norm.weight",
    "rms_norm.weight": "trunk.post_trunk_norm.weight",
    "encoder.layers.{i}.attention.out_proj.weight": "trunk.blocks.{i}.attn.proj.weight",
    "encoder.layers.{i}.rms_norm1.weight": "trunk.blocks.{i}.norm_1.weight",
    "encoder.layers.{i}.rms_norm2.weight": "trunk.blocks.{i}.norm_2.weight",
    "encoder.layers.{i}.ffn.gate_proj.weight": "trunk.blocks.{i}.mlp.fc1.weight",
    "encoder.layers.{i}.ffn.up_proj.weight": "trunk.blocks.{i}.mlp.fc3.weight",
    "encoder.layers.{i}.ffn.down_proj.weight": "trunk.blocks.{i}.mlp.fc2.weight",
}


def aimv2_to_sail_state_dict(model: torch.nn.Module, num_layers: int) -> dict[str, np.ndarray]:
    """Aimv2VisionModel weights renamed to upstream `vision_model.*` keys (q/k/v rows fused into qkv)."""
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    out = {"vision_model.preprocessor.pos_embed": sd.pop("embeddings.position_embedding.weight")[None]}
    for i in range(num_layers):
        a = f"encoder.layers.{i}.attention."
        out[f"vision_model.trunk.blocks.{i}.attn.qkv.weight"] = np.concatenate(
            [sd.pop(a + "q_proj.weight"), sd.pop(a + "k_proj.weight"), sd.pop(a + "v_proj.weight")]
        )
    for hf, sail in AIMV2_TO_SAIL.items():
        for i in (range(num_layers) if "{i}" in hf else [None]):
            out["vision_model." + sail.format(i=i)] = sd.pop(hf.format(i=i))
    if sd:
        raise KeyError(f"unmapped Aimv2 keys: {sorted(sd)}")
    return out


def torch_vit_params(model: torch.nn.Module, cfg: ModelConfig, abstract_vit_params, scanned: bool) -> dict:
    """Aimv2VisionModel weights -> our SailViT `params` tree through the vision rows of the mapping table."""
    sd = aimv2_to_sail_state_dict(model, cfg.vision.num_layers)
    entries = [e for e in model_entries(cfg, scanned) if e.hf_key.startswith("vision_model.")]
    tree = import_params(entries, sd.__getitem__, {"vision_model": abstract_vit_params}, available_keys=sd.keys())
    return tree["vision_model"]
