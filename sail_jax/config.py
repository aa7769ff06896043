"""Model configuration: frozen dataclasses, the published presets, and the upstream config.json reader.

Architecture (what the model *is*) lives in `VisionConfig`, `AdapterConfig`, `LLMConfig` / `MoEConfig`;
how it *runs* (dtypes, kernels, scan, remat) lives in `RuntimeConfig`, so one checkpoint can be run many ways.
Every value of the presets is taken from the upstream release (../shared/docs/sailvl2-reference.md §2).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
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
    # AnyRes: optional axial 2D RoPE in the ViT (off for released checkpoints).
    use_2d_rope: bool = False
    rope_theta: float = 10000.0
    max_anyres_patches: int = 16384

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"VisionConfig.hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}"
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
# Presets (values from the upstream config.json files; reference doc §2 and §8)

_SAIL_VIT_HUGE = VisionConfig()
_QWEN3_1_7B = LLMConfig(
    hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
    # config.json says tie_word_embeddings=true, but upstream loads the stored lm_head untied (§8.3).
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
_TINY_LLM = LLMConfig(
    hidden_size=32, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
)

PRESETS: dict[str, ModelConfig] = {
    "sailvl2-2b": ModelConfig(vision=_SAIL_VIT_HUGE, llm=_QWEN3_1_7B),
    "sailvl2-8b": ModelConfig(vision=_SAIL_VIT_HUGE, llm=_QWEN3_8B),
    "sailvl2-a3b": ModelConfig(vision=_SAIL_VIT_HUGE, llm=_QWEN3_30B_A3B),
    # Same shapes as ../shared/fixtures/sailvl2-tiny (the checkpoint made by the original code).
    "tiny": ModelConfig(vision=_TINY_VIT, llm=_TINY_LLM),
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


# ----------------------------------------------------------------------------------------------------------
# Upstream config.json


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
        # Upstream SAIL-VL2 ignores tying (§8.3); plain Qwen3 exports honour it only if no lm_head is stored,
        # which the loaders decide from the weights, not from this flag.
        tie_word_embeddings=False,
        max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
        moe=moe,
    )


def vision_config_from_hf(d: dict, where: str = "vision_config") -> VisionConfig:
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
    """Read an upstream SAIL-VL2 `config.json` (file or checkpoint directory) into a ModelConfig."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
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
        # The class default is -4, but every release sets it; read it, never assume (§13).
        select_layer=int(d.get("select_layer", -4)),
        max_dynamic_patch=int(d.get("max_dynamic_patch", 12)),
        min_dynamic_patch=int(d.get("min_dynamic_patch", 1)),
        use_thumbnail=bool(d.get("use_thumbnail", True)),
        template=str(d.get("template", "univl-chat")),
    )


def to_dict(cfg: Any) -> dict:
    """JSON-friendly dict of any config dataclass (used when a checkpoint stores its config)."""
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `to_dict` for ModelConfig; unknown keys are an error naming the key."""

    def build(cls, sub: dict, where: str):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(sub) - set(fields)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        kwargs = {}
        for k, v in sub.items():
            if k == "moe":
                kwargs[k] = None if v is None else build(MoEConfig, v, f"{where}.moe")
            elif isinstance(v, list):
                kwargs[k] = tuple(v)
            else:
                kwargs[k] = v
        return cls(**kwargs)

    parts = {"vision": VisionConfig, "adapter": AdapterConfig, "llm": LLMConfig, "runtime": RuntimeConfig}
    unknown = set(d) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"model config: unknown keys {sorted(unknown)}")
    return ModelConfig(**{k: build(parts[k], v, k) if k in parts else v for k, v in d.items()})
