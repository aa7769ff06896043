"""The gin entry point of `sail-jax rl`: `rl` (sail_jax.rl.loop.rl) and its parts registered here, never in library
code; the model configurables come from `sail_jax.training.gin_setup` (bound field by field the same way).

`configs/rl/base.gin` wires the macros into `rl` (MODEL, WORKDIR, PROMPTS) and the parts (`PolicyLossConfig`,
`RewardConfig` with its `RewardWeights`, `OptimizerConfig`, `CheckpointConfig`); each stage file includes it and
binds its fields.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import gin

from sail_jax.rl.learner import PolicyLossConfig
from sail_jax.rl.loop import rl
from sail_jax.rl.rewards import RewardWeights
from sail_jax.rl.rollout import RewardConfig
from sail_jax.training import gin_setup as train_gin

REQUIRED_MACROS = ("MODEL", "WORKDIR", "PROMPTS")
RL_PARTS: dict[str, type] = {"PolicyLossConfig": PolicyLossConfig, "RewardConfig": RewardConfig,
                             "RewardWeights": RewardWeights}
# Registered unlocked: this module may first be imported after a `train` run in the same process finalized (locked)
# the gin config.
with gin.unlock_config():
    _rl_with_gin = gin.configurable("rl")(rl)
    gin.external_configurable(PolicyLossConfig, "PolicyLossConfig")
    gin.external_configurable(RewardConfig, "RewardConfig")
    gin.external_configurable(RewardWeights, "RewardWeights")


def parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()) -> None:
    """Parse the files and bindings (one-line errors naming the file/binding) and check the required macros."""
    train_gin.parse(gin_files, bindings, search_paths, required=REQUIRED_MACROS, finalize=False)


def rl_arguments() -> dict[str, Any]:
    """`rl`'s keyword arguments as bound (defaults where unbound), each configurable's bindings type-checked and
    every argument without a default set; raises ValueError naming the binding otherwise."""
    for name, cls in {**train_gin.MODEL_PARTS, **train_gin.RUN_PARTS, **RL_PARTS}.items():
        train_gin.checked_bindings(name, cls)
    bound = train_gin.checked_bindings("rl", rl)
    args = {}
    for name, param in inspect.signature(rl).parameters.items():
        if name in bound:
            args[name] = bound[name]
        elif param.default is inspect.Parameter.empty:
            raise ValueError(f"rl.{name} is not set: add --gin.rl.{name}=... (or a --gin_file that binds it)")
    return args


def rl_using_gin(resume: bool = False, **overrides: Any) -> dict[str, float]:
    """Run `rl` with its gin bindings (checked first); `overrides` (CLI flags) win over them."""
    rl_arguments()
    return _rl_with_gin(resume=resume, **overrides)


def workdir() -> str:
    return train_gin.workdir()
