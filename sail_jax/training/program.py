"""The train program: what `train` runs and `sail-jax compile` compiles ahead of time, built in one place.

A program is the mesh of a run, its static loss budget, the shardings of the train state, the jitted
initialisers and the jitted step (state donated). `build_program` checks the run's sizes and returns it; the
pieces are cached per configuration, so repeated `train` calls in a process (tests, sweeps) reuse the same jitted
functions and hence their compilations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sail_jax.config import ModelConfig
from sail_jax.data.batch import BATCH_AXES, batch_shards
from sail_jax.models.sail_vl import SailVL, dummy_inputs
from sail_jax.params import abstract_model_params
from sail_jax.sharding import mesh_from_spec, tree_shardings
from sail_jax.training.optim import OptimizerConfig, check_trainable, make_optimizer, make_schedule
from sail_jax.training.step import TrainState, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """Everything derived from (model, optimizer, trainable groups, mesh, loss budget, steps, micro-batches)."""

    mesh: Mesh
    trainable: tuple[str, ...]
    targets_per_row: int  # static target positions per row that reach the lm_head (pooled per batch shard)
    microbatches: int  # micro-batches per step (gradient accumulation)
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    shardings: TrainState
    tx: optax.GradientTransformation
    init_params: Callable[[jax.Array], Any]  # jitted: rng -> sharded params
    init_opt_state: Callable[[Any], Any]  # jitted: params -> sharded optimizer state
    copy_state: Callable[[TrainState], TrainState]  # jitted: state -> a copy (AdaLRS snapshot)
    step: Any  # jitted (state, batch, step, lr_scale) -> (state, metrics), state donated


def opt_state_shardings(abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer leaves mirroring a parameter (Adam moments) take its sharding; the rest is replicated.

    A leaf mirrors a parameter when its key path ends with that parameter's key path.
    """
    by_path = {tuple(map(str, p)): s for p, s in jax.tree_util.tree_leaves_with_path(param_shardings)}
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        keys = tuple(map(str, path))
        for start in range(len(keys)):
            if keys[start:] in by_path:
                return by_path[keys[start:]]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


LAYOUT_ARGS = ("mesh", "batch_size", "seq_len", "steps", "target_fraction", "microbatches")


def run_layout(mesh: dict[str, int] | None, batch_size: int, seq_len: int, steps: int, target_fraction: float,
               microbatches: int = 1, devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, int]:
    """(mesh, target positions per row) of a run, with its sizes checked; `LAYOUT_ARGS` are `train`'s names."""
    mesh_ = mesh_from_spec(mesh or {"fsdp": -1}, devices)
    shards = batch_shards(mesh_)
    if batch_size % shards or batch_size % jax.process_count():
        raise ValueError(
            f"batch_size={batch_size} must be divisible by the batch shards of the mesh ({shards} = "
            f"{'*'.join(f'{a}:{mesh_.shape[a]}' for a in BATCH_AXES)}) and by {jax.process_count()} processes"
        )
    if microbatches < 1 or batch_size % (shards * microbatches):
        raise ValueError(
            f"microbatches={microbatches} must be >= 1 and split each of the {shards} batch shards' "
            f"{batch_size // shards} rows evenly (batch_size={batch_size})"
        )
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction={target_fraction} must be in (0, 1]")
    return mesh_, max(1, math.ceil(target_fraction * seq_len))


def build_program(
    *,
    model: ModelConfig,
    batch_size: int,
    seq_len: int,
    steps: int,
    trainable: Sequence[str] = ("vision", "adapter", "llm"),
    optimizer: OptimizerConfig = OptimizerConfig(),
    mesh: dict[str, int] | None = None,
    target_fraction: float = 1.0,
    microbatches: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> TrainProgram:
    """The program of a `train` run with these arguments (same meaning as `train`'s) on `devices` (default: this
    process's). Nothing is compiled or allocated until its functions are called or lowered."""
    trainable = check_trainable(trainable)
    mesh_, targets_per_row = run_layout(mesh, batch_size, seq_len, steps, target_fraction, microbatches, devices)
    state = _state_functions(model, optimizer, trainable, mesh_)
    return TrainProgram(mesh=mesh_, trainable=trainable, targets_per_row=targets_per_row, microbatches=microbatches,
                        **state, step=_jitted_step(model, optimizer, trainable, targets_per_row, steps, mesh_,
                                                   microbatches))


@functools.lru_cache(maxsize=8)
def _state_functions(cfg: ModelConfig, opt: OptimizerConfig, trainable: tuple[str, ...], mesh: Mesh
                     ) -> dict[str, Any]:
    boxed = abstract_model_params(cfg)["params"]
    param_sh = tree_shardings(boxed, mesh)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    abstract_params = jax.tree.map(with_sharding, nn.unbox(boxed), param_sh)
    tx = make_optimizer(opt, abstract_params, trainable)
    opt_abstract = jax.eval_shape(tx.init, abstract_params)
    opt_sh = opt_state_shardings(opt_abstract, param_sh, mesh)
    state_sh = TrainState(param_sh, opt_sh)
    model, (ids, pix) = SailVL(cfg), dummy_inputs(cfg)
    return dict(
        abstract_state=TrainState(abstract_params, jax.tree.map(with_sharding, opt_abstract, opt_sh)),
        shardings=state_sh,
        tx=tx,
        init_params=jax.jit(lambda rng: nn.unbox(model.init(rng, ids, pix))["params"], out_shardings=param_sh),
        init_opt_state=jax.jit(tx.init, out_shardings=opt_sh),
        copy_state=jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=state_sh),
    )


@functools.lru_cache(maxsize=8)
def _jitted_step(cfg: ModelConfig, opt: OptimizerConfig, trainable: tuple[str, ...], targets_per_row: int,
                 total_steps: int, mesh: Mesh, microbatches: int):
    state = _state_functions(cfg, opt, trainable, mesh)
    fn = make_train_step(cfg, state["tx"], make_schedule(opt, total_steps), trainable, targets_per_row,
                         batch_shards(mesh), microbatches)
    return jax.jit(fn, out_shardings=(state["shardings"], None), donate_argnums=0)
