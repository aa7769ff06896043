"""Config: presets, the upstream config.json reader, dict round trip, clear errors."""

from __future__ import annotations

import json

import pytest

from sail_jax.config import (
    PRESETS,
    ConfigError,
    from_hf_config,
    get_preset,
    model_config_from_dict,
    to_dict,
)
from tests.conftest import DATA


def test_fixture_config_equals_tiny_preset():
    cfg = from_hf_config(DATA / "sailvl2-tiny" / "checkpoint")
    tiny = get_preset("tiny")
    assert cfg.vision == tiny.vision and cfg.llm == tiny.llm and cfg.adapter == tiny.adapter
    assert cfg.select_layer == -1 and cfg.tokens_per_tile == 256


def test_upstream_values_of_presets():
    two_b = get_preset("sailvl2-2b")
    assert (two_b.llm.hidden_size, two_b.llm.num_layers, two_b.llm.num_heads, two_b.llm.num_kv_heads) == (
        2048, 28, 16, 8)
    assert two_b.llm.rope_theta == 1e6 and two_b.vision.hidden_size == 1536 and two_b.vision.num_layers == 24
    a3b = get_preset("sailvl2-a3b").llm
    assert a3b.moe.num_experts == 128 and a3b.moe.num_experts_per_tok == 8 and a3b.moe.norm_topk_prob
    assert all(a3b.is_moe_layer(i) for i in range(a3b.num_layers))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_round_trip(name):
    cfg = get_preset(name, dtype="bfloat16")
    assert model_config_from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        get_preset("huge")
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
    with pytest.raises(ConfigError, match="unknown keys"):
        model_config_from_dict({"llm": {"hidden": 3}})


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
