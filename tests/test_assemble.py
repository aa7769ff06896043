"""`sail-jax convert assemble`: a SAIL-VL2 directory from tiny random transformers parts (Qwen3, Qwen3-MoE,
Aimv2VisionModel native or not, a SAIL-VL2 directory's ViT): text logits equal the LLM's, the vision tower equals
AIMv2's, tokens are added (and the embedding grown) where the tokenizer lacks them, bad parts are refused."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from converters.assemble import SAIL_TOKENS, adapter_part
from converters.hf_checkpoint import SafetensorsCheckpoint
from converters.load import load_checkpoint
from sail_jax.cli import main
from sail_jax.config import IMG_CONTEXT_TOKEN_ID, ModelConfig
from sail_jax.data.tokenizer import SailTokenizer
from sail_jax.models.sail_vit import SailViT
from sail_jax.models.sail_vl import SailVL
from tests.conftest import DATA

QWEN3_LEN = 151669  # a Qwen3 tokenizer: the SAIL-VL2 tokenizer without its 9 added tokens


def _tokenizer(dst, strip: bool) -> None:
    """tests/data/tokenizer into `dst`, with the SAIL-VL2 tokens removed when `strip` (a plain Qwen3 tokenizer)."""
    for f in (DATA / "tokenizer").iterdir():
        shutil.copy2(f, dst / f.name)
    if strip:
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg["added_tokens_decoder"] = {i: t for i, t in cfg["added_tokens_decoder"].items()
                                       if t["content"] not in SAIL_TOKENS}
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
        added = json.loads((dst / "added_tokens.json").read_text())
        (dst / "added_tokens.json").write_text(json.dumps({k: v for k, v in added.items() if k not in SAIL_TOKENS}))


def _qwen3(directory, moe: bool, vocab: int, strip: bool):
    torch.manual_seed(1)
    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, attn_implementation="eager")
    if moe:
        config = transformers.Qwen3MoeConfig(**kw, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                             norm_topk_prob=True, tie_word_embeddings=True)
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw, tie_word_embeddings=False))
    model.eval().save_pretrained(directory)
    _tokenizer(directory, strip)
    return model


def _aimv2(directory, native: bool):
    torch.manual_seed(2)
    config = transformers.Aimv2VisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14,
        rms_norm_eps=1e-5, hidden_act="silu", qkv_bias=False, mlp_bias=False, use_head=not native, is_native=native,
        attn_implementation="eager")
    model = transformers.Aimv2VisionModel(config).eval()
    with torch.no_grad():  # non-trivial norms and conv bias so a mis-mapped tensor cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    for name in ("qwen3", "aimv2"):
        (root / name).mkdir()
    return root, _qwen3(root / "qwen3", moe=False, vocab=QWEN3_LEN, strip=True), _aimv2(root / "aimv2", native=False)


def _text_logits_match(model, directory, vocab: int) -> ModelConfig:
    cfg, params = load_checkpoint(directory)  # what every --checkpoint reads
    ids = np.random.default_rng(0).integers(0, vocab, size=(2, 12))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(jax.jit(SailVL(cfg).apply)(params, jnp.asarray(ids, jnp.int32)).logits)
    assert np.abs(ours[..., :vocab] - ref).max() <= 1e-4
    return cfg


def test_qwen3_and_aimv2_assemble_with_tokens_added(parts, tmp_path, capsys):
    root, qwen3, _ = parts
    dst = tmp_path / "sailvl"
    assert main(["convert", "assemble", "--llm", str(root / "qwen3"), "--vision", str(root / "aimv2"),
                 "--dst", str(dst), "--adapter-seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "added the SAIL-VL2 special tokens <img> </img> <IMG_CONTEXT>" in out and "151669-151677" in out
    assert f"from {QWEN3_LEN} to 151678 rows" in out
    cfg = _text_logits_match(qwen3, dst, QWEN3_LEN)
    assert cfg.img_context_token_id == IMG_CONTEXT_TOKEN_ID and cfg.llm.vocab_size == 151678
    # the tokenizer now encodes like SAIL-VL2's; the new embedding rows are the mean of the old ones
    ours, release = SailTokenizer.from_dir(dst), SailTokenizer.from_dir(DATA / "tokenizer")
    text = "<img><IMG_CONTEXT></img> a <box>1</box>"
    assert ours.encode(text) == release.encode(text) and len(ours) == 151678
    with SafetensorsCheckpoint(dst) as ckpt:
        emb = ckpt["language_model.model.embed_tokens.weight"]
        head = ckpt["language_model.lm_head.weight"]
        mlp1 = {k: ckpt[k] for k in ckpt.keys() if k.startswith("mlp1.")}
    ref_emb = qwen3.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(emb[QWEN3_LEN:], np.broadcast_to(ref_emb.mean(0), (9, 32)), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(emb[:QWEN3_LEN], ref_emb)
    np.testing.assert_allclose(head[QWEN3_LEN:], np.broadcast_to(qwen3.lm_head.weight.detach().numpy().mean(0),
                                                                  (9, 32)), rtol=1e-6, atol=1e-7)
    # the adapter: our model's initialisation under the seed
    seeded = adapter_part(cfg, 3).tensors
    assert mlp1.keys() == seeded.keys() and all(np.array_equal(mlp1[k], seeded[k][1]()) for k in mlp1)
    assert not all(np.array_equal(mlp1[k], adapter_part(cfg, 4).tensors[k][1]()) for k in mlp1)


def _vision_matches(aimv2, directory, size: int) -> None:
    cfg, params = load_checkpoint(directory)
    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = aimv2(torch.from_numpy(pixels)).last_hidden_state.numpy()
    vit = SailViT(cfg.vision, cfg.runtime, cfg.select_layer)  # the layer SAIL-VL2 feeds the adapter
    ours = jax.jit(vit.apply)({"params": params["params"]["vision_model"]}, jnp.asarray(pixels)).selected
    assert cfg.select_layer == -1 and np.abs(np.asarray(ours) - ref).max() <= 1e-5


def test_vision_tower_is_aimv2s_and_a_sailvl_directory_gives_its_vit(parts, tmp_path):
    root, _, aimv2 = parts
    first, second = tmp_path / "a", tmp_path / "b"
    (tmp_path / "moe").mkdir()
    moe = _qwen3(tmp_path / "moe", moe=True, vocab=151936, strip=False)  # tied, tokenizer already has the tokens
    assert main(["convert", "assemble", "--llm", str(tmp_path / "moe"), "--vision", str(root / "aimv2"),
                 "--dst", str(first)]) == 0
    _vision_matches(aimv2, first, 56)
    assert _text_logits_match(moe, first, 151936).llm.moe.num_experts == 4
    assert "img_context_token_id" not in json.loads((first / "config.json").read_text())  # the release's id
    # the ViT of a SAIL-VL2 directory (the same layout as a SAIL-ViT directory's, under vision_model.)
    assert main(["convert", "assemble", "--llm", str(tmp_path / "moe"), "--vision", str(first),
                 "--dst", str(second)]) == 0
    with SafetensorsCheckpoint(first) as a, SafetensorsCheckpoint(second) as b:
        vit = [k for k in a.keys() if k.startswith("vision_model.")]
        assert vit and all(np.array_equal(a[k], b[k]) for k in vit)


def test_native_aimv2_gets_its_sincos_positions(parts, tmp_path):
    root, _, _ = parts
    (tmp_path / "native").mkdir()
    aimv2 = _aimv2(tmp_path / "native", native=True)
    dst = tmp_path / "out"
    assert main(["convert", "assemble", "--llm", str(root / "qwen3"), "--vision", str(tmp_path / "native"),
                 "--dst", str(dst), "--preset", "tiny"]) == 2  # the preset's architecture is not these parts'
    assert not dst.exists()
    assert main(["convert", "assemble", "--llm", str(root / "qwen3"), "--vision", str(tmp_path / "native"),
                 "--dst", str(dst)]) == 0
    _vision_matches(aimv2, dst, 448)  # a native AIMv2 runs at the model's tile size (448 px)


def test_mismatched_hidden_size_and_missing_tensor_are_refused(parts, tmp_path, capsys):
    root, _, _ = parts
    args = ["convert", "assemble", "--llm", str(root / "qwen3"), "--dst", str(tmp_path / "out")]
    assert main([*args, "--vision", str(root / "aimv2"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "do not match --preset tiny" in err and "hidden_size=32 but preset 'tiny' has" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy2(root / "aimv2" / "config.json", broken / "config.json")
    with SafetensorsCheckpoint(root / "aimv2") as ckpt:
        kept = {k: torch.from_numpy(ckpt[k]) for k in ckpt.keys() if k != "encoder.layers.1.ffn.up_proj.weight"}
    from safetensors.torch import save_file

    save_file(kept, str(broken / "model.safetensors"))
    assert main([*args, "--vision", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "missing tensor 'encoder.layers.1.ffn.up_proj.weight'" in err and "mlp.fc3.weight" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
