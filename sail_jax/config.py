"""Model configuration: frozen dataclasses, their validation, and the published presets.

Architecture (what the model *is*) lives in `VisionConfig`, `AdapterConfig`, `LLMConfig` / `MoEConfig`;
how it *runs* (dtypes, kernels, scan, remat) lives in `RuntimeConfig`, so one checkpoint can be run many ways.
Every value of the presets is taken from the released config.json files. Reading and writing config.json and our
checkpoints' `model_config/` item belong to `converters/` (hf_config.py, model_config.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

IMG_CONTEXT_TOKEN_ID = 151671
IMG_START_TOKEN_ID = 151669
IMG_END_TOKEN_ID = 151670
IM_START_TOKEN_ID = 151644
IM_END_TOKEN_ID = 151645
PAD_TOKEN_ID = 151643

ATTENTION_IMPLS = ("xla", "pallas")
# MoE kernels: the experts' grouped matmul (sail_jax/layers/grouped_matmul.py) is jax.lax.ragged_dot, a tiled XLA
# form, or the Pallas gmm/tgmm kernels; "pallas" also takes the router's top-k from the Pallas routing kernel
# (pallas_kernels/moe; the others route in jnp).
MOE_IMPLS = ("ragged_dot", "tiled", "pallas")
# Expert-parallel token exchange: "auto" picks ragged_all_to_all except on XLA:CPU, which lacks it.
MOE_A2A = ("auto", "ragged", "padded")
REMAT_POLICIES = ("none", "full", "dots_saveable")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Qwen3-MoE sparse block (router + SwiGLU experts)."""

    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    # None = dropless; a float enables token dropping with capacity = ceil(tokens*k/E * factor).
    capacity_factor: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"MoEConfig.num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                f"{self.num_experts}]"
            )
        if self.decoder_sparse_step < 1:
            raise ConfigError(f"MoEConfig.decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"MoEConfig.capacity_factor={self.capacity_factor} must be > 0 (or None = dropless)")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Qwen3 decoder (dense, or MoE when `moe` is set)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    moe: MoEConfig | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"LLMConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"LLMConfig.head_dim={self.head_dim} must be even for rotate-half RoPE")

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen3-MoE rule: sparse unless listed in mlp_only_layers, every `decoder_sparse_step`-th layer."""
        m = self.moe
        if m is None or m.num_experts <= 0:
            return False
        return layer not in m.mlp_only_layers and (layer + 1) % m.decoder_sparse_step == 0


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SAIL-ViT (AIMv2 architecture)."""

    hidden_size: int = 1536
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 12
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    use_bias: bool = False
    # SAIL-ViT-AnyRes: `anyres` makes every path (processor, pipeline, trainer, engine) feed native-resolution
    # images packed into one patch sequence instead of 448x448 tiles; the parameters are the same. Images are
    # resized to at most `max_anyres_patches` patches (1792x1792) and small ones up to `min_anyres_patches`.
    anyres: bool = False
    use_2d_rope: bool = False  # optional axial 2D RoPE in the ViT (off for released checkpoints)
    rope_theta: float = 10000.0
    max_anyres_patches: int = 16384
    min_anyres_patches: int = 4

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"VisionConfig.hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}"
            )
        if not 4 <= self.min_anyres_patches <= self.max_anyres_patches:
            raise ConfigError(
                f"VisionConfig: need 4 <= min_anyres_patches ({self.min_anyres_patches}) <= max_anyres_patches "
                f"({self.max_anyres_patches}): one 28x28 image is 4 patches"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """mlp1: pixel shuffle -> LayerNorm -> Linear -> GELU(erf) -> Linear."""

    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    layer_norm_eps: float = 1e-5
    # N(0, init_std) init of both Linears (from-scratch runs only; checkpoints carry their weights). At 0.02 a
    # small adapter's GELU sees inputs of ~0.3 and is nearly linear, so a fresh adapter passes on little of the
    # patch-content x position interaction an LLM needs to tell where a shape is (configs/demo.gin: 0.0625).
    init_std: float = 0.02


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How the model runs: precision policy, kernel choice, layer scan, rematerialisation."""

    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    moe_impl: str = "ragged_dot"
    moe_a2a: str = "auto"
    scan_layers: bool = False
    remat_policy: str = "none"
    # XLA attention processes queries in chunks of this many rows when the sequence is longer (memory bound).
    attention_q_chunk: int = 2048

    def __post_init__(self):
        for name, allowed in (
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
            ("attention_impl", ATTENTION_IMPLS),
            ("moe_impl", MOE_IMPLS),
            ("moe_a2a", MOE_A2A),
            ("remat_policy", REMAT_POLICIES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"RuntimeConfig.{name}={value!r}; expected one of {allowed}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole SAIL-VL2 model."""

    vision: VisionConfig = VisionConfig()
    adapter: AdapterConfig = AdapterConfig()
    llm: LLMConfig = LLMConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    select_layer: int = -1
    img_context_token_id: int = IMG_CONTEXT_TOKEN_ID
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    template: str = "univl-chat"

    def __post_init__(self):
        n = self.vision.num_layers
        if not (-n <= self.select_layer < n):
            raise ConfigError(f"ModelConfig.select_layer={self.select_layer} out of range for {n} ViT layers")

    @property
    def tokens_per_tile(self) -> int:
        return int(self.vision.num_patches * self.adapter.downsample_ratio**2)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_runtime(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **changes))


# ----------------------------------------------------------------------------------------------------------
# Presets (values from the upstream config.json files)

_SAIL_VIT_HUGE = VisionConfig()
_QWEN3_1_7B = LLMConfig(
    hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
    # config.json says tie_word_embeddings=true, but the checkpoint stores an lm_head and upstream loads it untied.
    tie_word_embeddings=False,
)
_QWEN3_8B = LLMConfig(
    hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
)
_QWEN3_30B_A3B = LLMConfig(
    hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
    moe=MoEConfig(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
)
_TINY_VIT = VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)
# AnyRes test model: a small pixel budget (448x448 = 1024 patches) keeps the packed rows short.
_TINY_ANYRES_VIT = dataclasses.replace(_TINY_VIT, anyres=True, use_2d_rope=True, max_anyres_patches=1024)
_TINY_LLM = LLMConfig(
    hidden_size=32, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
)

PRESETS: dict[str, ModelConfig] = {
    "sailvl2-2b": ModelConfig(vision=_SAIL_VIT_HUGE, llm=_QWEN3_1_7B),
    "sailvl2-8b": ModelConfig(vision=_SAIL_VIT_HUGE, llm=_QWEN3_8B),
    # SAIL-VL2-AnyRes-2B: SAIL-ViT-AnyRes (native resolution up to 1792x1792, 2D RoPE) + Qwen3-1.7B.
    "sailvl2-anyres-2b": ModelConfig(vision=dataclasses.replace(_SAIL_VIT_HUGE, anyres=True, use_2d_rope=True),
                                     llm=_QWEN3_1_7B),
    "sailvl2-a3b": ModelConfig(vision=_SAIL_VIT_HUGE, llm=_QWEN3_30B_A3B),
    # Same shapes as tests/data/sailvl2-tiny (the checkpoint made by the original code).
    "tiny": ModelConfig(vision=_TINY_VIT, llm=_TINY_LLM),
    "tiny-anyres": ModelConfig(vision=_TINY_ANYRES_VIT, llm=_TINY_LLM),
    "tiny-moe": ModelConfig(
        vision=_TINY_VIT,
        llm=dataclasses.replace(
            _TINY_LLM,
            moe=MoEConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True),
        ),
    ),
}


def get_preset(name: str, **runtime: Any) -> ModelConfig:
    """A named preset, optionally with runtime overrides (e.g. `dtype="bfloat16"`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[name]
    return cfg.with_runtime(**runtime) if runtime else cfg
