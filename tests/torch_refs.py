"""Helpers that build tiny transformers reference models and load their weights into sail-jax params."""

from __future__ import annotations

import torch

from converters.core import import_params
from converters.mapping import llm_entries
from sail_jax.config import LLMConfig


def llm_config_from_torch(hf_cfg) -> LLMConfig:
    from sail_jax.config import llm_config_from_hf

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
