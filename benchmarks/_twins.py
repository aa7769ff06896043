"""Shared setup of the benchmarks that race our engine against transformers `generate` (not a benchmark itself:
`make bench` skips `_` files): the same weights on both sides (a random Qwen3, or the LLM of the tiny test checkpoint
exported by our converter) and a timed, left-padded transformers generation."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from converters.convert import export_llm  # noqa: E402
from converters.load import load_checkpoint  # noqa: E402
from sail_jax.config import ModelConfig, RuntimeConfig  # noqa: E402
from sail_jax.models.qwen3 import Qwen3ForCausalLM  # noqa: E402
from sail_jax.models.sail_vl import SailVL  # noqa: E402
from sail_jax.sharding import abstract_params  # noqa: E402
from tests.torch_refs import llm_config_from_torch, torch_llm_params  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "tests" / "data" / "sailvl2-tiny" / "checkpoint"


def random_qwen3(vocab: int) -> tuple[transformers.Qwen3ForCausalLM, Qwen3ForCausalLM, dict]:
    """A random Qwen3 (hidden 256, 4 layers) in transformers and the same weights in ours."""
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    cfg = llm_config_from_torch(hf_cfg)
    lm = Qwen3ForCausalLM(cfg, RuntimeConfig())
    abstract = abstract_params(lm, jnp.zeros((1, 4), jnp.int32))["params"]
    params = {"params": jax.tree.map(jnp.asarray, torch_llm_params(hf, cfg, abstract, scanned=False))}
    return hf, lm, params


def tiny_checkpoint() -> tuple[transformers.PreTrainedModel, SailVL, dict, ModelConfig]:
    """The tiny test checkpoint (float32): its LLM exported by `convert export-llm` and loaded by transformers, and
    the whole model (vision too) in ours."""
    cfg, params = load_checkpoint(TINY, RuntimeConfig())
    with tempfile.TemporaryDirectory() as tmp:
        export_llm(TINY, Path(tmp) / "llm", dtype="float32", progress=False)
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "llm", dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
    return hf, SailVL(cfg), params, cfg


def hf_generate(hf: transformers.PreTrainedModel, prompts: list[np.ndarray], new_tokens: int, pad_token_id: int,
                **kwargs) -> tuple[float, np.ndarray]:
    """Seconds and new tokens [rows, new_tokens] (pad after a stop) of one timed `generate` on left-padded prompts;
    `kwargs` go to `generate` (sampling, stop ids, num_return_sequences ...)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.from_numpy(np.asarray(p, np.int64))
        mask[i, width - len(p):] = 1
    kwargs = dict(use_cache=True, pad_token_id=pad_token_id, attention_mask=mask, **kwargs)
    with torch.inference_mode():
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, **kwargs)
        return time.perf_counter() - start, out[:, width:].numpy()
