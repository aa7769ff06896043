"""Config: the presets' upstream values and clear validation errors (config.json and the `model_config/` item
are read and written by converters/, tested in test_convert_schema.py and test_convert.py)."""

from __future__ import annotations

import pytest

from sail_jax.config import ConfigError, MoEConfig, get_preset


def test_upstream_values_of_presets():
    two_b = get_preset("sailvl2-2b")
    assert (two_b.llm.hidden_size, two_b.llm.num_layers, two_b.llm.num_heads, two_b.llm.num_kv_heads) == (
        2048, 28, 16, 8)
    assert two_b.llm.rope_theta == 1e6 and two_b.vision.hidden_size == 1536 and two_b.vision.num_layers == 24
    a3b = get_preset("sailvl2-a3b").llm
    assert a3b.moe.num_experts == 128 and a3b.moe.num_experts_per_tok == 8 and a3b.moe.norm_topk_prob
    assert all(a3b.is_moe_layer(i) for i in range(a3b.num_layers))


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ConfigError, match=r"RuntimeConfig.dtype='fp8'; expected one of"):
        get_preset("tiny", dtype="fp8")
    with pytest.raises(ConfigError, match=r"MoEConfig.num_experts_per_tok=9 must be in \[1, num_experts=8\]"):
        MoEConfig(num_experts=8, num_experts_per_tok=9)
