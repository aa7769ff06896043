"""Schema level, no weights allocated: for the 2B, 8B and A3B presets the converters' plan produces exactly the
upstream key set and shapes in both layouts, the config.json writers read back as the same model, and the
config.json reader takes the fixture's file and names what is wrong with a bad one."""

from __future__ import annotations

import json
import math

import pytest
import transformers

from converters.core import make_plan
from converters.hf_config import from_hf_config, sailvl_config_dict, transformers_llm_config_dict
from converters.mapping import model_entries
from sail_jax.config import ConfigError, ModelConfig, get_preset
from sail_jax.params import abstract_model_params
from tests.conftest import DATA
from tests.convert_helpers import abstract_params_for


def upstream_schema(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The upstream checkpoint's schema written out: every key and its PyTorch shape."""
    v, llm = cfg.vision, cfg.llm
    c, d, hd = v.hidden_size, llm.hidden_size, llm.head_dim
    out = {
        "vision_model.preprocessor.patchifier.proj.weight": (c, 3, 14, 14),
        "vision_model.preprocessor.patchifier.proj.bias": (c,),
        "vision_model.preprocessor.patchifier.norm.weight": (c,),
        "vision_model.preprocessor.pos_embed": (1, 1024, c),
        "vision_model.trunk.post_trunk_norm.weight": (c,),
        "mlp1.0.weight": (4 * c,), "mlp1.0.bias": (4 * c,),
        "mlp1.1.weight": (d, 4 * c), "mlp1.1.bias": (d,),
        "mlp1.3.weight": (d, d), "mlp1.3.bias": (d,),
        "language_model.model.embed_tokens.weight": (151936, d),
        "language_model.model.norm.weight": (d,),
        "language_model.lm_head.weight": (151936, d),
    }
    for i in range(v.num_layers):
        b = f"vision_model.trunk.blocks.{i}."
        out.update({b + "norm_1.weight": (c,), b + "norm_2.weight": (c,), b + "attn.qkv.weight": (3 * c, c),
                    b + "attn.proj.weight": (c, c), b + "mlp.fc1.weight": (v.intermediate_size, c),
                    b + "mlp.fc3.weight": (v.intermediate_size, c), b + "mlp.fc2.weight": (c, v.intermediate_size)})
    for i in range(llm.num_layers):
        p = f"language_model.model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (llm.num_heads * hd, d), p + "self_attn.k_proj.weight": (
                llm.num_kv_heads * hd, d), p + "self_attn.v_proj.weight": (llm.num_kv_heads * hd, d),
            p + "self_attn.o_proj.weight": (d, llm.num_heads * hd), p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
        })
        if llm.moe is None:
            n = llm.intermediate_size
            out.update({p + "mlp.gate_proj.weight": (n, d), p + "mlp.up_proj.weight": (n, d),
                        p + "mlp.down_proj.weight": (d, n)})
            continue
        m = llm.moe.moe_intermediate_size
        out[p + "mlp.gate.weight"] = (llm.moe.num_experts, d)
        for e in range(llm.moe.num_experts):
            q = f"{p}mlp.experts.{e}."
            out.update({q + "gate_proj.weight": (m, d), q + "up_proj.weight": (m, d), q + "down_proj.weight": (d, m)})
    return out


@pytest.mark.parametrize(
    "preset, scanned, count",
    [("sailvl2-2b", False, 490), ("sailvl2-2b", True, 490), ("sailvl2-8b", True, 578), ("sailvl2-a3b", True, 19046)],
)
def test_plan_gives_the_upstream_schema(preset, scanned, count):
    cfg = get_preset(preset)
    plan = make_plan(model_entries(cfg, scanned), abstract_params_for(cfg, scanned))
    hf = plan.hf_shapes()
    assert len(hf) == count
    assert hf == upstream_schema(cfg)
    if preset == "sailvl2-2b":
        assert sum(2 * math.prod(s) for s in hf.values()) == 5_461_130_240  # bf16 total_size
    if scanned:
        lm = ("language_model", "layers")
        assert plan.leaves[("vision_model", "blocks", "attn", "qkv", "kernel")].shape == (24, 1536, 3, 12, 128)
        assert plan.leaves[lm + ("self_attn", "o_proj", "kernel")].stacked == 1
        if cfg.llm.moe is not None:  # per-expert tensors fill one slice each of a [L, E, ...] array
            gate_up = plan.leaves[lm + ("mlp", "experts", "gate_proj")]
            assert (gate_up.shape, gate_up.stacked) == ((48, 128, 2048, 768), 2)
            assert plan.leaves[lm + ("mlp", "gate", "kernel")].shape == (48, 2048, 128)


@pytest.mark.parametrize("preset", ["sailvl2-2b", "sailvl2-8b", "sailvl2-a3b", "tiny-moe"])
def test_written_configs_read_back(preset, tmp_path):
    cfg = get_preset(preset)
    (tmp_path / "config.json").write_text(json.dumps(sailvl_config_dict(cfg, "bfloat16")))
    assert from_hf_config(tmp_path) == cfg
    llm_dir = tmp_path / "llm"
    llm_dir.mkdir()
    (llm_dir / "config.json").write_text(json.dumps(transformers_llm_config_dict(cfg.llm, "bfloat16")))
    assert from_hf_config(llm_dir).llm == cfg.llm
    hf = transformers.AutoConfig.from_pretrained(llm_dir)
    llm = cfg.llm
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (
        llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads, llm.head_dim)
    assert hf.rope_parameters == {"rope_theta": llm.rope_theta, "rope_type": "default"}
    assert hf.tie_word_embeddings is False and str(hf.dtype) == "torch.bfloat16"
    if llm.moe is not None:
        m = llm.moe
        assert type(hf).__name__ == "Qwen3MoeConfig"
        assert (hf.num_local_experts, hf.num_experts_per_tok, hf.moe_intermediate_size, hf.norm_topk_prob) == (
            m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.norm_topk_prob)


def test_plan_rejects_a_tree_of_another_layout_or_model():
    from converters.core import ConversionError

    cfg = get_preset("tiny", scan_layers=True)
    scanned = abstract_model_params(cfg)["params"]
    unscanned_path = r"our param path vision_model/blocks_0/\S+ \(for .vision_model.trunk.blocks.0.*is not among"
    with pytest.raises(ConversionError, match=unscanned_path):
        make_plan(model_entries(cfg, scanned=False), scanned)
    extra = {**scanned, "extra": {"kernel": scanned["mlp1"]["linear_1"]["kernel"]}}
    with pytest.raises(ConversionError, match=r"our params \['extra/kernel'\] are not covered by the mapping table"):
        make_plan(model_entries(cfg, scanned=True), extra)


def test_fixture_config_equals_tiny_preset():
    cfg = from_hf_config(DATA / "sailvl2-tiny" / "checkpoint")
    tiny = get_preset("tiny")
    assert cfg.vision == tiny.vision and cfg.llm == tiny.llm and cfg.adapter == tiny.adapter
    assert cfg.select_layer == -1 and cfg.tokens_per_tile == 256


def test_reader_errors_name_the_problem(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "sailvl",\n "vision_config": {,}}')
    with pytest.raises(ConfigError, match="invalid JSON at line 2"):
        from_hf_config(bad)
    bad.write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ConfigError, match="model_type='llava'"):
        from_hf_config(bad)
    bad.write_text(json.dumps({"model_type": "sailvl", "ps_version": "v2", "vision_config": {}, "llm_config": {}}))
    with pytest.raises(ConfigError, match="vision_config: missing key 'hidden_size'"):
        from_hf_config(bad)


def test_qwen_moe_config_reader(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", "vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 8, "mlp_only_layers": [1], "norm_topk_prob": True,
        "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"},
    }))
    llm = from_hf_config(tmp_path).llm
    assert llm.rope_theta == 5000.0 and llm.moe.mlp_only_layers == (1,)
    assert [llm.is_moe_layer(i) for i in range(3)] == [True, False, True]
