"""The tiny checkpoint made by the ORIGINAL implementation (tests/data/sailvl2-tiny, README there): every stored
intermediate and output is reproduced from the stored inputs, in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.load import load_checkpoint
from sail_jax.config import RuntimeConfig
from sail_jax.inference.forward import forward_outputs
from sail_jax.models.qwen3 import Qwen3DecoderLayer
from sail_jax.models.sail_vl import SailVL
from tests.conftest import DATA
from tests.greedy_reference import greedy_full_recompute

FIX = DATA / "sailvl2-tiny"


@pytest.fixture(scope="module")
def fixture():
    cfg, params = load_checkpoint(FIX / "checkpoint", RuntimeConfig())
    inputs = dict(np.load(FIX / "inputs.npz"))
    ref = dict(np.load(FIX / "outputs.npz"))
    return SailVL(cfg), params, inputs, ref


@pytest.fixture(scope="module")
def ours(fixture):
    model, params, inputs, ref = fixture
    positions = [int(p) for p in ref["log_softmax_positions"]] + [int(p) for p in ref["logits_last_positions"]]
    return forward_outputs(model, params, inputs["input_ids"], inputs["pixel_values"], positions)


def test_vision_adapter_and_embeddings(fixture, ours):
    _, _, _, ref = fixture
    for name in ("vit_last_hidden_state", "adapter_output", "inputs_embeds"):
        assert np.abs(ours[name] - ref[name]).max() <= 1e-4, name


def test_vit_per_block_states_and_embeddings(fixture):
    model, params, inputs, ref = fixture
    tiles = jnp.asarray(inputs["pixel_values"][ref["vit_hidden_states_tiles"]])
    vit = model.apply(params, tiles, True, method=SailVL.vision)
    got = np.stack([np.asarray(h) for h in vit.hidden_states])  # [L, tiles, N, C], as stored
    assert np.abs(got - ref["vit_hidden_states"]).max() <= 1e-4
    from sail_jax.models.anyres import patchify

    emb = model.apply(params, patchify(tiles, 14), method=lambda m, x: m.vision_model.embed(x))
    assert np.abs(np.asarray(emb) - ref["vit_embeddings"]).max() <= 1e-4
    from sail_jax.models.adapter import pixel_shuffle

    ps = pixel_shuffle(jnp.asarray(ref["vit_last_hidden_state"][:1]), 32, 32)
    assert np.abs(np.asarray(ps) - ref["pixel_shuffle_output_tile0"]).max() <= 1e-6


def test_llm_hidden_states(fixture):
    model, params, _, ref = fixture
    embeds = jnp.asarray(ref["inputs_embeds"])
    out, state = model.apply(
        params, None, inputs_embeds=embeds, return_hidden=True,
        method=lambda m, _, **kw: m.language_model(**kw),
        capture_intermediates=lambda mdl, _: isinstance(mdl, Qwen3DecoderLayer),
    )
    lm = state["intermediates"]["language_model"]
    layer_outs = [lm[f"layers_{i}"]["__call__"][0][0] for i in range(len(ref["llm_hidden_states"]) - 1)]
    assert np.abs(np.asarray(layer_outs[0][0]) - ref["llm_hidden_states"][1]).max() <= 1e-4
    assert np.abs(np.asarray(layer_outs[-1][0]) - ref["llm_last_layer_output_prenorm"]).max() <= 1e-4
    assert np.abs(np.asarray(out.hidden[0]) - ref["llm_hidden_states"][-1]).max() <= 1e-4


def test_logits(fixture, ours):
    _, _, _, ref = fixture
    n_ls = len(ref["log_softmax_positions"])
    log_softmax = np.asarray(jax.nn.log_softmax(ours["logits_at"][:n_ls], -1))
    assert np.abs(log_softmax - ref["log_softmax_at_positions"]).max() <= 1e-4
    assert np.abs(ours["logits_at"][n_ls:] - ref["logits_last"][0]).max() <= 1e-4
    assert np.abs(ours["logits_top5_values"] - ref["logits_top5_values"]).max() <= 1e-4
    assert np.abs(ours["logits_logsumexp"] - ref["logits_logsumexp"]).max() <= 1e-4
    decisive = ref["logits_top1_minus_top2"] > 1e-3
    assert decisive.mean() > 0.9
    np.testing.assert_array_equal(ours["logits_argmax"][decisive], ref["logits_argmax"][decisive])


def test_greedy_tokens(fixture):
    model, params, inputs, ref = fixture
    tokens, step_logits = greedy_full_recompute(
        model, params, inputs["input_ids"], inputs["pixel_values"], 16, int(inputs["eos_token_id"])
    )
    assert tokens == [int(t) for t in ref["generated_ids"][0]]
    top5 = np.sort(step_logits, -1)[:, ::-1][:, :5]
    assert np.abs(top5 - ref["generation_step_logits_top5_values"]).max() <= 1e-4


def test_forward_cli(tmp_path):
    from sail_jax.cli import main

    out = tmp_path / "out.npz"
    rc = main(["forward", "--checkpoint", str(FIX / "checkpoint"), "--inputs", str(FIX / "inputs.npz"),
               "--out", str(out), "--positions", "0,37"])
    assert rc == 0
    got, ref = np.load(out), np.load(FIX / "outputs.npz")
    assert got["logits_at"].shape == (2, 151936)
    assert np.abs(got["logits_logsumexp"] - ref["logits_logsumexp"]).max() <= 1e-4
    assert not list(tmp_path.glob("*.tmp*"))


def test_forward_cli_rejects_mismatched_inputs(tmp_path, capsys):
    from sail_jax.cli import main

    inputs = dict(np.load(FIX / "inputs.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:3])
    rc = main(["forward", "--checkpoint", str(FIX / "checkpoint"), "--inputs", str(bad), "--out",
               str(tmp_path / "o.npz")])
    assert rc == 2
    assert "1792 <IMG_CONTEXT> tokens but 768 image features" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()
