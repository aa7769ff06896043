"""Helpers for the converter tests: MoE param shapes without the MoE layer, synthetic upstream checkpoints,
and reading whole safetensors directories for byte comparisons."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import numpy as np
from safetensors import safe_open

from converters.core import make_plan
from converters.hf_config import sailvl_config_dict
from converters.hf_writer import TensorSpec, write_safetensors_dir
from converters.mapping import model_entries
from sail_jax.config import ModelConfig
from sail_jax.params import abstract_model_params


def abstract_params_for(cfg: ModelConfig, scanned: bool) -> dict:
    """Our (unboxed) param shapes for `cfg` in the given layout, without allocating anything."""
    return nn.unbox(abstract_model_params(cfg.with_runtime(scan_layers=scanned))["params"])


def synth_upstream(directory: Path, cfg: ModelConfig, abstract, seed: int = 0, dtype: str = "bfloat16") -> dict:
    """An upstream-format checkpoint (config.json + model.safetensors) with random weights for `cfg`."""
    directory.mkdir(parents=True)
    plan = make_plan(model_entries(cfg, scanned=False), abstract)
    rng = np.random.default_rng(seed)
    tensors = {k: (0.02 * rng.standard_normal(shape)).astype(dtype) for k, shape in plan.hf_shapes().items()}
    specs = [TensorSpec(k, v.shape, v.dtype) for k, v in tensors.items()]
    write_safetensors_dir(directory, specs, tensors.__getitem__)
    (directory / "config.json").write_text(json.dumps(sailvl_config_dict(cfg, dtype)))
    return tensors


def read_safetensors_dir(directory: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    """All tensors of a safetensors directory and each file's metadata."""
    tensors, metadata = {}, []
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            metadata.append(st.metadata())
            for k in st.keys():  # noqa: SIM118
                assert k not in tensors, f"{k} stored twice"
                tensors[k] = st.get_tensor(k)
    return tensors, metadata


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Identical key sets, and every tensor identical in dtype, shape and bytes."""
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), (k, g.dtype, g.shape, w.dtype, w.shape)
        assert g.tobytes() == w.tobytes(), k
