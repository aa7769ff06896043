"""The gin entry point (t5x pattern): configurables are registered here, never in library code.

`train` (sail_jax.training.trainer.train) is wrapped with `gin.configurable` here. Before any user file, the
base bindings declare the required macros and wire them into `train`:

    MODEL = %gin.REQUIRED     # a ModelConfig, usually @model_config() from configs/model/*.gin
    DATA = %gin.REQUIRED      # a data factory, @grain_data or @synthetic_data (not called: the trainer calls it)
    WORKDIR = %gin.REQUIRED   # checkpoints, metrics.jsonl, tensorboard/, config.gin

Gin files are parsed in order (later files override earlier ones), then `--gin_bindings` and `--gin.NAME=VALUE`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin

from sail_jax.config import ConfigError, ModelConfig, get_preset
from sail_jax.data.pipeline import grain_data
from sail_jax.resources import DATA_ROOT
from sail_jax.training.adalrs import AdaLRSConfig
from sail_jax.training.checkpointing import CheckpointConfig
from sail_jax.training.optim import OptimizerConfig
from sail_jax.training.synthetic import synthetic_data
from sail_jax.training.trainer import train

REQUIRED_MACROS = ("MODEL", "DATA", "WORKDIR")
BASE_BINDINGS = (
    *(f"{m} = %gin.REQUIRED" for m in REQUIRED_MACROS),
    "train.model = %MODEL",
    "train.data = %DATA",
    "train.workdir = %WORKDIR",
    "train.optimizer = @OptimizerConfig()",
    "train.checkpoint = @CheckpointConfig()",
)
REPO_ROOT = DATA_ROOT  # holds configs/: the checkout, or the installed package (sail_jax/resources.py)


def _replace(obj: Any, changes: dict | None, where: str) -> Any:
    if not changes:
        return obj
    fields = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ConfigError(f"model_config.{where}: unknown keys {unknown}; known: {sorted(fields)}")
    return dataclasses.replace(obj, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})


def model_config(
    preset: str,
    *,
    vision: dict | None = None,
    adapter: dict | None = None,
    llm: dict | None = None,
    moe: dict | None = None,
    runtime: dict | None = None,
    img_context_token_id: int | None = None,
) -> ModelConfig:
    """A preset from `sail_jax.config.PRESETS` with per-part overrides (dicts of field -> value)."""
    cfg = get_preset(preset)
    llm_cfg = _replace(cfg.llm, llm, "llm")
    if moe:
        if llm_cfg.moe is None:
            raise ConfigError(f"model_config.moe: preset {preset!r} has no MoE layers")
        llm_cfg = dataclasses.replace(llm_cfg, moe=_replace(llm_cfg.moe, moe, "moe"))
    cfg = cfg.replace(
        vision=_replace(cfg.vision, vision, "vision"), adapter=_replace(cfg.adapter, adapter, "adapter"),
        llm=llm_cfg, runtime=_replace(cfg.runtime, runtime, "runtime"),
    )
    if img_context_token_id is not None:
        cfg = cfg.replace(img_context_token_id=img_context_token_id)
    return cfg


train_using_gin = gin.configurable("train")(train)
gin.external_configurable(model_config, "model_config")
gin.external_configurable(synthetic_data, "synthetic_data")
gin.external_configurable(grain_data, "grain_data")
gin.external_configurable(OptimizerConfig, "OptimizerConfig")
gin.external_configurable(AdaLRSConfig, "AdaLRSConfig")
gin.external_configurable(CheckpointConfig, "CheckpointConfig")


def rewrite_gin_args(args: Sequence[str]) -> list[str]:
    """`--gin.NAME=VALUE` flags -> `NAME = VALUE` bindings.

    String values need quotes that survive the shell: --gin.WORKDIR=\\"/tmp/run\\" or --gin.WORKDIR="'/tmp/run'".
    """
    bindings = []
    for a in args:
        name, sep, value = a.removeprefix("--gin.").partition("=")
        if not a.startswith("--gin.") or not sep or not name:
            raise ValueError(f"{a}: expected --gin.NAME=VALUE")
        bindings.append(f"{name} = {value}")
    return bindings


def parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
          required: Sequence[str] = REQUIRED_MACROS, finalize: bool = True) -> None:
    """Reset gin, parse the base bindings, the files and the bindings; check the `required` macros; finalize
    (which also fails on any other `%gin.REQUIRED` left unset: skip it for commands that do not train)."""
    gin.clear_config()
    for p in (*search_paths, str(REPO_ROOT), str(Path.cwd())):
        gin.add_config_file_search_path(p)
    gin.parse_config(BASE_BINDINGS)
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
    unset = [m for m in required if _is_required(m)]
    if unset:
        raise ValueError(
            "required gin macro(s) not set: " + ", ".join(unset) + " (set them in a --gin_file or with "
            + " ".join(f"--gin.{m}=..." for m in unset) + ")"
        )
    if finalize:
        gin.finalize()


def _is_required(macro: str) -> bool:
    """A macro still bound to `%gin.REQUIRED` (gin only notices it when a configurable is called)."""
    return repr(gin.query_parameter(f"%{macro}")) == "%gin.REQUIRED"


def train_arguments(names: Sequence[str]) -> dict[str, Any]:
    """The named keyword arguments of `train` as the parsed config gives them (its defaults where unbound), for
    commands that build what `train` builds without running it; a `%gin.REQUIRED` one left unset is an error."""
    params = inspect.signature(train).parameters
    bound = gin.get_bindings("train")
    out = {}
    for name in names:
        value = bound.get(name, params[name].default)
        if value is gin.REQUIRED or value is inspect.Parameter.empty:
            raise ValueError(f"train.{name} is not set (it is %gin.REQUIRED): add --gin.train.{name}=...")
        out[name] = value
    return out


def data_option(name: str, default: Any) -> Any:
    """An option of the configured `train.data` factory (e.g. `grain_data.max_tiles`): bound, else the
    factory's own default, else `default`."""
    factory = gin.get_bindings("train").get("data")
    if factory is None or factory is gin.REQUIRED:
        return default
    param = inspect.signature(factory).parameters.get(name)
    if param is not None and param.default is not inspect.Parameter.empty:
        default = param.default
    value = gin.get_bindings(factory).get(name, default)
    return default if value is gin.REQUIRED else value


def workdir() -> str:
    return str(gin.query_parameter("%WORKDIR"))
