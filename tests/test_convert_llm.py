"""`export-llm` against transformers (dense and MoE), and the MoE checkpoint round trip (per-expert upstream keys
<-> stacked expert arrays) in both layouts."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from converters.convert import export_llm, hf_to_orbax, open_source, orbax_to_hf, write_ours
from converters.orbax_io import restore_params, stored_arrays
from sail_jax.cli import main
from sail_jax.config import RuntimeConfig, get_preset
from sail_jax.models.qwen3 import Qwen3ForCausalLM
from tests.conftest import DATA
from tests.convert_helpers import abstract_params_for, assert_same_tensors, read_safetensors_dir, synth_upstream

CKPT = DATA / "sailvl2-tiny" / "checkpoint"


def _load_transformers(directory):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _logits_match(model, d, llm_cfg, vocab):
    ids = np.random.default_rng(0).integers(0, vocab, size=(2, 24))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    params = restore_params(d, dtype="float32")["language_model"]
    apply = jax.jit(Qwen3ForCausalLM(llm_cfg, RuntimeConfig()).apply)
    ours = apply({"params": params}, jnp.asarray(ids, jnp.int32)).logits
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-5


def test_export_llm_dense_logits_match_transformers(tmp_path):
    d, out = tmp_path / "ours", tmp_path / "llm"
    cfg = hf_to_orbax(CKPT, d, progress=False)
    assert main(["convert", "export-llm", "--src", str(d), "--dst", str(out), "--dtype", "float32",
                 "--tokenizer", str(CKPT), "--no-progress"]) == 0
    model = _load_transformers(out)
    assert model.config.rope_parameters["rope_theta"] == 1e6 and not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # stored untied, loaded untied
    _logits_match(model, d, cfg.llm, cfg.llm.vocab_size)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "preprocessor_config.json").exists()  # the VLM's processor is not the LLM's


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A tiny SAIL-VL2 with a Qwen3-MoE LLM in upstream layout (per-expert keys); 3 layers, layer 1 dense."""
    base = get_preset("tiny-moe")
    llm = dataclasses.replace(base.llm, num_layers=3, moe=dataclasses.replace(base.llm.moe, mlp_only_layers=(1,)))
    cfg = base.replace(llm=llm)
    src = tmp_path_factory.mktemp("moe") / "upstream"
    tensors = synth_upstream(src, cfg, abstract_params_for(cfg, scanned=False))
    return cfg, src, tensors


@pytest.fixture(scope="module")
def moe_all_sparse(tmp_path_factory):
    """Every layer sparse, so the scanned layout (one stacked expert array per projection) applies."""
    cfg = get_preset("tiny-moe")
    src = tmp_path_factory.mktemp("moe") / "upstream"
    return cfg, src, synth_upstream(src, cfg, abstract_params_for(cfg, scanned=False), seed=1)


@pytest.mark.parametrize("case, scanned", [("moe", False), ("moe_all_sparse", True)])
def test_moe_round_trip_is_byte_identical(case, scanned, request, tmp_path):
    cfg, src, tensors = request.getfixturevalue(case)
    assert "language_model.model.layers.0.mlp.experts.7.down_proj.weight" in tensors
    _, source = open_source(src)
    d = tmp_path / "ours"
    write_ours(source, cfg, d, scan_layers=scanned, abstract=abstract_params_for(cfg, scanned), progress=False)
    arrays = stored_arrays(d)
    e, dm, i = cfg.llm.moe.num_experts, cfg.llm.hidden_size, cfg.llm.moe.moe_intermediate_size
    layer = ("language_model", "layers") if scanned else ("language_model", "layers_0")
    lead = (cfg.llm.num_layers,) if scanned else ()
    assert arrays[layer + ("mlp", "experts", "gate_proj")].shape == lead + (e, dm, i)
    assert arrays[layer + ("mlp", "experts", "down_proj")].shape == lead + (e, i, dm)
    assert arrays[layer + ("mlp", "gate", "kernel")].shape == lead + (dm, e)
    if not scanned:  # the dense layer among the sparse ones
        dense = ("language_model", "layers_1", "mlp", "gate_proj", "kernel")
        assert arrays[dense].shape == (dm, cfg.llm.intermediate_size)
    out = tmp_path / "hf"
    orbax_to_hf(d, out, progress=False)
    got, metadata = read_safetensors_dir(out)
    assert metadata == [{"format": "pt"}]
    assert_same_tensors(got, tensors)
    written = json.loads((out / "config.json").read_text())["llm_config"]
    assert written["num_experts"] == e and written["architectures"] == ["Qwen3MoeForCausalLM"]
    assert written["mlp_only_layers"] == list(cfg.llm.moe.mlp_only_layers)


@pytest.fixture(scope="module")
def moe_export(moe, tmp_path_factory):
    cfg, src, tensors = moe
    _, source = open_source(src)
    d = tmp_path_factory.mktemp("moe") / "ours"
    write_ours(source, cfg, d, abstract=abstract_params_for(cfg, False), progress=False)
    out = d.parent / "llm"
    export_llm(d, out, dtype="float32", progress=False)
    return cfg, d, out, tensors


def test_export_llm_moe_loads_in_transformers(moe_export):
    cfg, _, out, tensors = moe_export
    model = _load_transformers(out)
    m = cfg.llm.moe
    assert (model.config.num_experts, model.config.num_experts_per_tok, model.config.norm_topk_prob) == (
        m.num_experts, m.num_experts_per_tok, True)
    assert model.config.mlp_only_layers == [1]
    t = lambda k: torch.from_numpy(tensors[f"language_model.model.layers.{k}"].astype(np.float32))
    for layer in (0, 2):
        mlp = model.model.layers[layer].mlp
        assert torch.equal(mlp.gate.weight, t(f"{layer}.mlp.gate.weight"))
        for e in range(m.num_experts):
            p = f"{layer}.mlp.experts.{e}."
            gate_up = torch.cat([t(p + "gate_proj.weight"), t(p + "up_proj.weight")])
            assert torch.equal(mlp.experts.gate_up_proj[e], gate_up)
            assert torch.equal(mlp.experts.down_proj[e], t(p + "down_proj.weight"))
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, t("1.mlp.up_proj.weight"))


def test_export_llm_moe_logits_match_transformers(moe_export):
    cfg, d, out, _ = moe_export
    _logits_match(_load_transformers(out), d, cfg.llm, cfg.llm.vocab_size)
