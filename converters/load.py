"""Load an upstream SAIL-VL2 checkpoint directory into sail-jax params (scanned or unscanned layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from converters.core import import_params
from converters.hf_checkpoint import SafetensorsCheckpoint
from converters.hf_config import from_hf_config
from converters.mapping import model_entries
from sail_jax.config import ModelConfig, RuntimeConfig
from sail_jax.files import as_path


def load_sailvl_checkpoint(
    directory: str | Path, runtime: RuntimeConfig | None = None, dtype: Any = None
) -> tuple[ModelConfig, dict]:
    """(config, {"params": ...}) from an upstream directory; arrays are host numpy in the param dtype.

    lm_head is always read as its own tensor: the original code loads a stored lm_head untied.
    """
    from sail_jax.params import abstract_model_params

    cfg = from_hf_config(directory, runtime)
    abstract = abstract_model_params(cfg)["params"]
    with SafetensorsCheckpoint(directory) as ckpt:
        params = import_params(
            model_entries(cfg), ckpt.__getitem__, abstract, available_keys=ckpt.keys(), dtype=dtype,
            source=str(directory),
        )
    return cfg, {"params": params}


def load_checkpoint(directory: str | Path, runtime: RuntimeConfig | None = None) -> tuple[ModelConfig, dict]:
    """Any checkpoint directory we can run -> (config, device params in the runtime's param dtype).

    Upstream directories are read in the runtime's layout; our checkpoints (params/ + model_config/, also a
    trainer step directory) keep their stored layout (`scan_layers`), everything else comes from `runtime`.
    """
    import dataclasses

    import jax

    from converters.orbax_io import is_our_checkpoint, load_model_config, restore_params

    directory = as_path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory not found")
    runtime = runtime or RuntimeConfig()
    if is_our_checkpoint(directory):
        stored = load_model_config(directory)
        cfg = stored.replace(runtime=dataclasses.replace(runtime, scan_layers=stored.runtime.scan_layers))
        return cfg, {"params": restore_params(directory, cfg, dtype=runtime.param_dtype)}
    if not (directory / "config.json").exists():
        raise ValueError(
            f"{directory}: no config.json and no params/ + model_config/ (expected an upstream SAIL-VL2 checkpoint "
            "directory or a sail-jax checkpoint)"
        )
    cfg, params = load_sailvl_checkpoint(directory, runtime)
    return cfg, jax.tree.map(jnp.asarray, params)
