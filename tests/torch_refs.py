"""Helpers that build tiny transformers reference models and load their weights into sail-jax params."""

from __future__ import annotations

import numpy as np
import torch

from converters.core import import_params
from converters.mapping import aimv2_sources, llm_entries, model_entries
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


def aimv2_to_sail_state_dict(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Aimv2VisionModel weights renamed to upstream `vision_model.*` keys through the converters' AIMv2 table."""
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    out = {sail: np.concatenate([sd.pop(k) for k in parts]) for sail, parts in aimv2_sources(cfg.vision).items()}
    out["vision_model.preprocessor.pos_embed"] = out["vision_model.preprocessor.pos_embed"][None]
    if sd:
        raise KeyError(f"unmapped Aimv2 keys: {sorted(sd)}")
    return out


def torch_vit_params(model: torch.nn.Module, cfg: ModelConfig, abstract_vit_params, scanned: bool) -> dict:
    """Aimv2VisionModel weights -> our SailViT `params` tree through the vision rows of the mapping table."""
    sd = aimv2_to_sail_state_dict(model, cfg)
    entries = [e for e in model_entries(cfg, scanned) if e.hf_key.startswith("vision_model.")]
    tree = import_params(entries, sd.__getitem__, {"vision_model": abstract_vit_params}, available_keys=sd.keys())
    return tree["vision_model"]
