"""Load an upstream SAIL-VL2 checkpoint directory into sail-jax params (scanned or unscanned layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from converters.core import import_params
from converters.hf_checkpoint import SafetensorsCheckpoint, local_upstream_dir
from converters.hf_config import from_hf_config
from converters.mapping import model_entries
from sail_jax.config import ModelConfig, RuntimeConfig
from sail_jax.files import as_path


def load_sailvl_checkpoint(
    directory: str | Path, runtime: RuntimeConfig | None = None, dtype: Any = None
) -> tuple[ModelConfig, dict]:
    """(config, {"params": ...}) from an upstream directory (local, or a URL read from its local copy); arrays are
    host numpy in the param dtype.

    lm_head is always read as its own tensor: the original code loads a stored lm_head untied.
    """
    from sail_jax.params import abstract_model_params

    source, directory = str(directory), local_upstream_dir(directory)  # messages name what was given
    cfg = from_hf_config(directory, runtime)
    abstract = abstract_model_params(cfg)["params"]
    with SafetensorsCheckpoint(directory) as ckpt:
        params = import_params(
            model_entries(cfg), ckpt.__getitem__, abstract, available_keys=ckpt.keys(), dtype=dtype,
            source=source,
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


def initial_params(directory: str | Path, cfg: ModelConfig, abstract_params: Any) -> Any:
    """What `train.init_from` / `rl.init_from` start from, in the shardings and dtypes of `abstract_params`
    (ShapeDtypeStructs with shardings): our checkpoint (or a workdir's newest step) restored in place and checked
    against `cfg` (`restore_model_params`), or an upstream directory, local or on a URL (read from its local copy),
    whose config.json must match `cfg`, read in `cfg`'s layout. Call it outside a mesh scope (the upstream reader
    builds its abstract tree without one)."""
    import jax
    import numpy as np

    from converters.model_config import config_differences, model_config_to_dict, refuse_mismatch
    from converters.orbax_io import is_our_checkpoint, resolve_checkpoint, restore_model_params

    d = as_path(resolve_checkpoint(directory))
    if not d.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory not found")
    if is_our_checkpoint(d):
        return restore_model_params(d, cfg, abstract_params)
    if not (d / "config.json").is_file():
        raise ValueError(f"{directory}: neither a sail-jax checkpoint (params/ + model_config/) nor an upstream "
                         "directory (config.json)")
    stored = from_hf_config(local_upstream_dir(d), cfg.runtime)
    refuse_mismatch(d, config_differences(model_config_to_dict(stored), cfg))
    _, params = load_sailvl_checkpoint(d, cfg.runtime)
    return jax.tree.map(lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding), params["params"],
                        abstract_params)
