"""The ONE name-mapping table between upstream (HF / PyTorch) keys and sail-jax params.

Each `Rule` names an HF key pattern, our param path pattern and a per-tensor transform. `expand_rules` turns
the patterns into concrete `Entry`s for a config and layout (scanned or not): an entry says which HF tensor
fills which slice (`index` over stacked leading axes) of which of our arrays. Import and export both walk the
same entries and use the two directions of the same transform, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np

from sail_jax.config import LLMConfig, ModelConfig, VisionConfig


@dataclasses.dataclass(frozen=True)
class Transform:
    """`to_ours(hf_array, our_slice_shape)` and `to_hf(our_slice, hf_shape)`; `hf_shape(our_slice_shape)`.

    Both directions return views where numpy can (transposes, axis splits/merges): the streaming converters copy
    block by block, so a large tensor is never duplicated whole.
    """

    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


def _linear(n_in: int) -> Transform:
    """torch Linear weight [out, in] <-> our kernel [*in_dims, *out_dims] (first `n_in` dims are inputs)."""

    def split(shape):
        return math.prod(shape[:n_in]), math.prod(shape[n_in:])

    return Transform(
        to_ours=lambda x, shape: x.T.reshape(shape),
        to_hf=lambda y: y.reshape(split(y.shape)).T,
        hf_shape=lambda shape: split(shape)[::-1],
    )


TRANSFORMS: dict[str, Transform] = {
    "copy": Transform(lambda x, shape: x.reshape(shape), lambda y: y, lambda shape: tuple(shape)),
    "linear": _linear(1),
    "linear_in2": _linear(2),
    # Conv2d [out, in, kh, kw] <-> flax Conv [kh, kw, in, out]
    "conv": Transform(
        to_ours=lambda x, shape: x.transpose(2, 3, 1, 0),
        to_hf=lambda y: y.transpose(3, 2, 0, 1),
        hf_shape=lambda s: (s[3], s[2], s[0], s[1]),
    ),
    # flat [prod(shape)] <-> our shape (e.g. a fused qkv bias [3C] <-> [3, H, hd])
    "flat": Transform(lambda x, shape: x.reshape(shape), lambda y: y.reshape(-1), lambda s: (math.prod(s),)),
    # [1, N, D] <-> [N, D]
    "squeeze0": Transform(lambda x, shape: x.reshape(shape), lambda y: y[None], lambda s: (1, *s)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # may contain {i} (layer) and {e} (expert)
    ours: str  # '/'-separated path; {i} only where the layout is unscanned
    transform: str


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_key: str
    path: tuple[str, ...]  # our param path
    index: tuple[int, ...]  # slice of the leading (stacked) axes of our array; () = whole array
    transform: str


def qwen3_rules(cfg: LLMConfig, hf_prefix: str = "", ours_prefix: str = "") -> list[tuple[Rule, str]]:
    """Rules for the Qwen3 / Qwen3-MoE language model as (rule, scope); scope is one of
    "global", "layer", "dense_layer", "moe_layer", "expert"."""
    h, o = hf_prefix, ours_prefix
    rules: list[tuple[Rule, str]] = [
        (Rule(f"{h}model.embed_tokens.weight", f"{o}embed_tokens/embedding", "copy"), "global"),
        (Rule(f"{h}model.norm.weight", f"{o}norm/scale", "copy"), "global"),
    ]
    if not cfg.tie_word_embeddings:
        rules.append((Rule(f"{h}lm_head.weight", f"{o}lm_head/kernel", "linear"), "global"))
    lp, lo = f"{h}model.layers.{{i}}.", f"{o}{{layer}}/"  # {layer} = layers_{i} or the scanned "layers"
    for name, kind in (("q_proj", "linear"), ("k_proj", "linear"), ("v_proj", "linear"),
                       ("o_proj", "linear_in2")):
        rules.append((Rule(f"{lp}self_attn.{name}.weight", f"{lo}self_attn/{name}/kernel", kind), "layer"))
    for name in ("q_norm", "k_norm"):
        rules.append((Rule(f"{lp}self_attn.{name}.weight", f"{lo}self_attn/{name}/scale", "copy"), "layer"))
    for name in ("input_layernorm", "post_attention_layernorm"):
        rules.append((Rule(f"{lp}{name}.weight", f"{lo}{name}/scale", "copy"), "layer"))
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules.append((Rule(f"{lp}mlp.{name}.weight", f"{lo}mlp/{name}/kernel", "linear"), "dense_layer"))
    if cfg.moe is not None:
        rules.append((Rule(f"{lp}mlp.gate.weight", f"{lo}mlp/gate/kernel", "linear"), "moe_layer"))
        for name in ("gate_proj", "up_proj", "down_proj"):
            rules.append(
                (Rule(f"{lp}mlp.experts.{{e}}.{name}.weight", f"{lo}mlp/experts/{name}", "linear"), "expert")
            )
    return rules


def vision_rules(cfg: VisionConfig) -> list[tuple[Rule, str]]:
    """SAIL-ViT (`vision_model.*`) rules; blocks are the per-layer scope."""
    h, o = "vision_model.", "vision_model/"
    rules: list[tuple[Rule, str]] = [
        (Rule(f"{h}preprocessor.patchifier.proj.weight", f"{o}patch_proj/kernel", "conv"), "global"),
        (Rule(f"{h}preprocessor.patchifier.proj.bias", f"{o}patch_proj/bias", "copy"), "global"),
        (Rule(f"{h}preprocessor.patchifier.norm.weight", f"{o}patch_norm/scale", "copy"), "global"),
        (Rule(f"{h}preprocessor.pos_embed", f"{o}pos_embed", "squeeze0"), "global"),
        (Rule(f"{h}trunk.post_trunk_norm.weight", f"{o}post_trunk_norm/scale", "copy"), "global"),
    ]
    bp, bo = f"{h}trunk.blocks.{{i}}.", f"{o}{{layer}}/"
    for name in ("norm_1", "norm_2"):
        rules.append((Rule(f"{bp}{name}.weight", f"{bo}{name}/scale", "copy"), "layer"))
    rules.append((Rule(f"{bp}attn.qkv.weight", f"{bo}attn/qkv/kernel", "linear"), "layer"))
    rules.append((Rule(f"{bp}attn.proj.weight", f"{bo}attn/proj/kernel", "linear_in2"), "layer"))
    if cfg.qkv_bias:
        rules.append((Rule(f"{bp}attn.qkv.bias", f"{bo}attn/qkv/bias", "flat"), "layer"))
    if cfg.use_bias:
        rules.append((Rule(f"{bp}attn.proj.bias", f"{bo}attn/proj/bias", "copy"), "layer"))
    for name in ("fc1", "fc2", "fc3"):
        rules.append((Rule(f"{bp}mlp.{name}.weight", f"{bo}mlp/{name}/kernel", "linear"), "layer"))
        if cfg.use_bias:
            rules.append((Rule(f"{bp}mlp.{name}.bias", f"{bo}mlp/{name}/bias", "copy"), "layer"))
    return rules


def adapter_rules() -> list[tuple[Rule, str]]:
    """`mlp1.{0,1,3}` (LayerNorm, Linear, Linear; index 2 is the GELU)."""
    return [
        (Rule("mlp1.0.weight", "mlp1/layer_norm/scale", "copy"), "global"),
        (Rule("mlp1.0.bias", "mlp1/layer_norm/bias", "copy"), "global"),
        (Rule("mlp1.1.weight", "mlp1/linear_1/kernel", "linear"), "global"),
        (Rule("mlp1.1.bias", "mlp1/linear_1/bias", "copy"), "global"),
        (Rule("mlp1.3.weight", "mlp1/linear_2/kernel", "linear"), "global"),
        (Rule("mlp1.3.bias", "mlp1/linear_2/bias", "copy"), "global"),
    ]


def _expand(
    rules: Iterable[tuple[Rule, str]],
    num_layers: int,
    scanned: bool,
    layer_base: str,
    is_moe: Callable[[int], bool] = lambda i: False,
    num_experts: int = 0,
) -> list[Entry]:
    out: list[Entry] = []
    for rule, scope in rules:
        if scope == "global":
            out.append(Entry(rule.hf, tuple(rule.ours.split("/")), (), rule.transform))
            continue
        for i in range(num_layers):
            if scope == "dense_layer" and is_moe(i) or scope in ("moe_layer", "expert") and not is_moe(i):
                continue
            layer = layer_base if scanned else f"{layer_base}_{i}"
            path = tuple(rule.ours.format(layer=layer).split("/"))
            lead = (i,) if scanned else ()
            if scope == "expert":
                for e in range(num_experts):
                    out.append(Entry(rule.hf.format(i=i, e=e), path, lead + (e,), rule.transform))
            else:
                out.append(Entry(rule.hf.format(i=i), path, lead, rule.transform))
    return out


def llm_entries(cfg: LLMConfig, scanned: bool, hf_prefix: str = "", ours_prefix: str = "") -> list[Entry]:
    """Entries for a language model alone (transformers `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` keys)."""
    n_exp = cfg.moe.num_experts if cfg.moe is not None else 0
    return _expand(qwen3_rules(cfg, hf_prefix, ours_prefix), cfg.num_layers, scanned, "layers",
                   cfg.is_moe_layer, n_exp)


def model_entries(cfg: ModelConfig, scanned: bool | None = None) -> list[Entry]:
    """Entries for a whole upstream SAIL-VL2 checkpoint: vision_model.*, mlp1.*, language_model.*."""
    scanned = cfg.runtime.scan_layers if scanned is None else scanned
    return (
        _expand(vision_rules(cfg.vision), cfg.vision.num_layers, scanned, "blocks")
        + _expand(adapter_rules(), 0, scanned, "")
        + llm_entries(cfg.llm, scanned, "language_model.", "language_model/")
    )


# transformers `Aimv2VisionModel` names -> SAIL-ViT names (no `vision_model.` prefix); {i} = block. SAIL-ViT fuses
# the q, k, v projections into one `qkv` (rows q, then k, then v) and stores the position table as [1, N, C].
AIMV2_TO_SAIL: dict[str, str] = {
    "embeddings.patch_embed.weight": "preprocessor.patchifier.proj.weight",
    "embeddings.patch_embed.bias": "preprocessor.patchifier.proj.bias",
    "embeddings.rms_norm.weight": "preprocessor.patchifier.norm.weight",
    "embeddings.position_embedding.weight": "preprocessor.pos_embed",
    "rms_norm.weight": "trunk.post_trunk_norm.weight",
    "encoder.layers.{i}.rms_norm1.weight": "trunk.blocks.{i}.norm_1.weight",
    "encoder.layers.{i}.rms_norm2.weight": "trunk.blocks.{i}.norm_2.weight",
    "encoder.layers.{i}.attention.out_proj.weight": "trunk.blocks.{i}.attn.proj.weight",
    "encoder.layers.{i}.attention.out_proj.bias": "trunk.blocks.{i}.attn.proj.bias",
    "encoder.layers.{i}.ffn.gate_proj.weight": "trunk.blocks.{i}.mlp.fc1.weight",
    "encoder.layers.{i}.ffn.gate_proj.bias": "trunk.blocks.{i}.mlp.fc1.bias",
    "encoder.layers.{i}.ffn.up_proj.weight": "trunk.blocks.{i}.mlp.fc3.weight",
    "encoder.layers.{i}.ffn.up_proj.bias": "trunk.blocks.{i}.mlp.fc3.bias",
    "encoder.layers.{i}.ffn.down_proj.weight": "trunk.blocks.{i}.mlp.fc2.weight",
    "encoder.layers.{i}.ffn.down_proj.bias": "trunk.blocks.{i}.mlp.fc2.bias",
}
AIMV2_QKV = ("q_proj", "k_proj", "v_proj")


def aimv2_sources(cfg: VisionConfig, native: bool = False) -> dict[str, tuple[str, ...]]:
    """Upstream SAIL-ViT key (`vision_model.*`) -> the Aimv2VisionModel keys it is made of: one key, or the q, k, v
    projections concatenated along their first axis (reshaped to the SAIL-ViT shape in either case). A native
    AIMv2 has no position table (it computes 2-D sin-cos positions), so `preprocessor.pos_embed` is left out."""
    wanted = {e.hf_key for e in _expand(vision_rules(cfg), cfg.num_layers, False, "blocks")}
    out: dict[str, tuple[str, ...]] = {}
    for aim, sail in AIMV2_TO_SAIL.items():
        for i in range(cfg.num_layers) if "{i}" in aim else [None]:
            out["vision_model." + sail.format(i=i)] = (aim.format(i=i),)
    for i in range(cfg.num_layers):
        for kind in ("weight", "bias"):
            qkv = tuple(f"encoder.layers.{i}.attention.{p}.{kind}" for p in AIMV2_QKV)
            out[f"vision_model.trunk.blocks.{i}.attn.qkv.{kind}"] = qkv
    if native:
        del out["vision_model.preprocessor.pos_embed"]
    return {k: v for k, v in out.items() if k in wanted}
