"""Qwen3 dense decoder vs transformers `Qwen3ForCausalLM` (the reference implementation)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sail_jax.config import RuntimeConfig
from sail_jax.models.qwen3 import Qwen3ForCausalLM
from sail_jax.sharding import abstract_params
from tests.torch_refs import llm_config_from_torch, torch_llm_params

SEQ_LONG = 520


@pytest.fixture(scope="module")
def reference():
    """Awkward shapes on purpose: GQA ratio 3, head_dim != hidden/heads, 3 layers, rope_theta 1e4."""
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(
        vocab_size=1000, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=24, rope_parameters={"rope_theta": 1e4, "rope_type": "default"},
        rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=4096,
        attn_implementation="eager",
    )
    model = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a mis-mapped norm cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    cfg = llm_config_from_torch(hf_cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, hf_cfg.vocab_size, size=(2, SEQ_LONG)).astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.float().numpy()
    return model, cfg, ids, ref


def _ours(model, cfg, rt: RuntimeConfig):
    lm = Qwen3ForCausalLM(cfg, rt)
    abstract = abstract_params(lm, jnp.zeros((1, 4), jnp.int32))["params"]
    params = torch_llm_params(model, cfg, abstract, scanned=rt.scan_layers)
    return lm, {"params": jax.tree.map(jnp.asarray, params)}


def test_config_read_from_transformers(reference):
    _, cfg, _, _ = reference
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (3, 6, 2, 24)
    assert cfg.rope_theta == 1e4


@pytest.mark.parametrize("scan", [False, True])
def test_fp32_logits_match_transformers(reference, scan):
    model, cfg, ids, ref = reference
    lm, params = _ours(model, cfg, RuntimeConfig(scan_layers=scan))
    logits = np.asarray(jax.jit(lm.apply)(params, jnp.asarray(ids, jnp.int32)).logits)
    assert np.abs(logits - ref).max() <= 1e-4
    # the long sequence really exercises far positions
    assert np.abs(logits[:, 400:] - ref[:, 400:]).max() <= 1e-4


def test_scanned_and_unscanned_identical(reference):
    model, cfg, ids, _ = reference
    out = []
    for scan in (False, True):
        lm, params = _ours(model, cfg, RuntimeConfig(scan_layers=scan))
        out.append(np.asarray(jax.jit(lm.apply)(params, jnp.asarray(ids[:, :64], jnp.int32)).logits))
    # Same math; XLA fuses a scan body and an unrolled loop differently, so allow float32 rounding only.
    np.testing.assert_allclose(out[0], out[1], rtol=0, atol=1e-6)


def test_packed_equals_separate(reference):
    model, cfg, ids, _ = reference
    lm, params = _ours(model, cfg, RuntimeConfig())
    a, b = ids[0, :37], ids[1, :50]
    pad = 3
    row = np.concatenate([a, b, np.zeros(pad, np.int64)])[None]
    seg = np.concatenate([np.full(37, 1), np.full(50, 2), np.zeros(pad)])[None].astype(np.int32)
    pos = np.concatenate([np.arange(37), np.arange(50), np.zeros(pad)])[None].astype(np.int32)
    packed = np.asarray(
        lm.apply(params, jnp.asarray(row, jnp.int32), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
        .logits
    )
    alone_a = np.asarray(lm.apply(params, jnp.asarray(a[None], jnp.int32)).logits)
    alone_b = np.asarray(lm.apply(params, jnp.asarray(b[None], jnp.int32)).logits)
    assert np.abs(packed[0, :37] - alone_a[0]).max() <= 1e-5
    assert np.abs(packed[0, 37:87] - alone_b[0]).max() <= 1e-5
    assert np.isfinite(packed).all()


def test_bf16_compute_kl(reference):
    model, cfg, ids, ref = reference
    lm, params = _ours(model, cfg, RuntimeConfig(dtype="bfloat16", param_dtype="float32"))
    logits = np.asarray(jax.jit(lm.apply)(params, jnp.asarray(ids, jnp.int32)).logits, np.float32)
    logp = jax.nn.log_softmax(jnp.asarray(ref), -1)
    logq = jax.nn.log_softmax(jnp.asarray(logits), -1)
    kl = np.asarray(jnp.sum(jnp.exp(logp) * (logp - logq), -1))
    assert kl.max() <= 5e-3, kl.max()
    assert kl.mean() > 0  # really ran in bf16


def test_tied_embeddings_use_embedding_matrix(reference):
    _, cfg, ids, _ = reference
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    lm = Qwen3ForCausalLM(tied, RuntimeConfig())
    params = lm.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))
    assert "lm_head" not in params["params"]
    out = lm.apply(params, jnp.asarray(ids[:1, :8], jnp.int32), return_hidden=True)
    emb = params["params"]["embed_tokens"]["embedding"].value
    np.testing.assert_allclose(
        np.asarray(lm.apply(params, jnp.asarray(ids[:1, :8], jnp.int32)).logits),
        np.asarray(out.hidden @ emb.T), atol=1e-5,
    )
