"""`train(...)`: the training loop. A plain typed function; the CLI wraps it with gin.

One run = build the mesh and the sharded train state (fresh, `init_from` a model checkpoint, or `resume` from
the workdir's latest checkpoint), then loop: next process-local batch -> global arrays -> jitted step (state
donated) -> metrics -> AdaLRS -> checkpoint. SIGTERM checkpoints at the next step boundary and returns.
Non-finite steps are skipped by the step itself; `max_consecutive_skips` in a row abort the run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from converters.orbax_io import restore_model_params
from sail_jax.config import ModelConfig
from sail_jax.models.sail_vl import SailVL
from sail_jax.params import abstract_model_params, dummy_inputs
from sail_jax.sharding import mesh_from_spec, tree_shardings, use_mesh
from sail_jax.training import distributed
from sail_jax.training.adalrs import Action, AdaLRS, AdaLRSConfig
from sail_jax.training.checkpointing import CheckpointConfig, Checkpointer
from sail_jax.training.data import DataFactory, check_batch, to_global
from sail_jax.training.metrics import MetricsWriter, peak_flops_per_device, step_flops
from sail_jax.training.optim import OptimizerConfig, check_trainable, make_optimizer, make_schedule
from sail_jax.training.step import TrainState, make_train_step

BATCH_AXES = ("data", "fsdp", "expert")


class TrainingAborted(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row); the message says why."""


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


@dataclasses.dataclass(frozen=True)
class _Setup:
    """Everything derived from (model, optimizer, trainable groups, mesh), built once per process."""

    abstract_params: Any
    abstract_opt_state: Any
    shardings: TrainState
    tx: optax.GradientTransformation
    init_params: Any  # jitted: rng -> sharded params
    init_opt_state: Any  # jitted: params -> sharded optimizer state
    copy_state: Any  # jitted: state -> a copy (AdaLRS snapshot)


@functools.lru_cache(maxsize=8)
def _setup(cfg: ModelConfig, opt: OptimizerConfig, trainable: tuple[str, ...], mesh: Mesh) -> _Setup:
    boxed = abstract_model_params(cfg)["params"]
    param_sh = tree_shardings(boxed, mesh)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    abstract_params = jax.tree.map(with_sharding, nn.unbox(boxed), param_sh)
    tx = make_optimizer(opt, abstract_params, trainable)
    opt_abstract = jax.eval_shape(tx.init, abstract_params)
    opt_sh = opt_state_shardings(opt_abstract, param_sh, mesh)
    state_sh = TrainState(param_sh, opt_sh)
    model, (ids, pix) = SailVL(cfg), dummy_inputs(cfg)
    return _Setup(
        abstract_params=abstract_params,
        abstract_opt_state=jax.tree.map(with_sharding, opt_abstract, opt_sh),
        shardings=state_sh,
        tx=tx,
        init_params=jax.jit(lambda rng: nn.unbox(model.init(rng, ids, pix))["params"], out_shardings=param_sh),
        init_opt_state=jax.jit(tx.init, out_shardings=opt_sh),
        copy_state=jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=state_sh),
    )


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch rows are split: the product of the data-parallel axes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


@functools.lru_cache(maxsize=8)
def _compiled_step(cfg: ModelConfig, opt: OptimizerConfig, trainable: tuple[str, ...], targets_per_row: int,
                   total_steps: int, mesh: Mesh):
    """One jitted step per configuration, so repeated `train` calls in a process reuse the compilation."""
    setup = _setup(cfg, opt, trainable, mesh)
    fn = make_train_step(cfg, setup.tx, make_schedule(opt, total_steps), trainable, targets_per_row,
                         batch_shards(mesh))
    return jax.jit(fn, out_shardings=(setup.shardings, None), donate_argnums=0)


def run_layout(mesh: dict[str, int] | None, batch_size: int, seq_len: int, steps: int, target_fraction: float,
               devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, int]:
    """(mesh, target positions per row) of a run, with its sizes checked; shared by `train` and `aot`."""
    mesh_ = mesh_from_spec(mesh or {"fsdp": -1}, devices)
    shards = batch_shards(mesh_)
    if batch_size % shards or batch_size % jax.process_count():
        raise ValueError(
            f"batch_size={batch_size} must be divisible by the batch shards of the mesh ({shards} = "
            f"{'*'.join(f'{a}:{mesh_.shape[a]}' for a in BATCH_AXES)}) and by {jax.process_count()} processes"
        )
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction={target_fraction} must be in (0, 1]")
    return mesh_, max(1, math.ceil(target_fraction * seq_len))


def train(
    *,
    model: ModelConfig,
    data: DataFactory,
    workdir: str,
    steps: int,
    batch_size: int,
    seq_len: int,
    trainable: Sequence[str] = ("vision", "adapter", "llm"),
    optimizer: OptimizerConfig = OptimizerConfig(),
    adalrs: AdaLRSConfig | None = None,
    checkpoint: CheckpointConfig = CheckpointConfig(),
    mesh: dict[str, int] | None = None,
    target_fraction: float = 1.0,
    seed: int = 0,
    resume: bool = False,
    init_from: str | None = None,
    max_consecutive_skips: int = 5,
    log_every: int = 100,
    peak_flops: float | None = None,
) -> dict[str, float]:
    """Train `model` for `steps` global batches of `batch_size` rows x `seq_len` tokens; returns the last metrics.

    `mesh` maps axes of (data, fsdp, tensor, expert) to sizes (-1 = the rest; default all devices on fsdp).
    `target_fraction` bounds the target positions per row that reach the lm_head (a static loss budget,
    pooled over the rows of each batch shard).
    """
    cfg = model
    trainable = check_trainable(trainable)
    mesh_, targets_per_row = run_layout(mesh, batch_size, seq_len, steps, target_fraction)
    workdir_ = Path(workdir).absolute()
    workdir_.mkdir(parents=True, exist_ok=True)
    setup = _setup(cfg, optimizer, trainable, mesh_)
    ckpt = Checkpointer(workdir_, checkpoint)
    try:
        latest = ckpt.latest_step()
        if latest is not None and not resume:
            raise ValueError(f"{ckpt.directory} already holds checkpoints (latest step {latest}); pass --resume "
                             f"(train.resume=True) to continue, or use another workdir")
        data_iter = data(cfg=cfg, global_batch_size=batch_size, seq_len=seq_len,
                         process_index=jax.process_index(), process_count=jax.process_count(), seed=seed)
        run = _Run(cfg=cfg, mesh=mesh_, ckpt=ckpt, data_iter=data_iter, steps=steps, batch_size=batch_size,
                   seq_len=seq_len, trainable=trainable, targets_per_row=targets_per_row,
                   max_consecutive_skips=max_consecutive_skips,
                   controller=AdaLRS(adalrs, steps) if adalrs is not None else None)
        with use_mesh(mesh_):
            if resume and latest is not None:
                state, start = run.restore(latest, setup.abstract_params, setup.abstract_opt_state)
            else:
                if init_from:
                    params = restore_model_params(init_from, cfg, setup.abstract_params)
                else:
                    params = setup.init_params(jax.random.PRNGKey(seed))
                state, start = TrainState(params, setup.init_opt_state(params)), 0
            step_fn = _compiled_step(cfg, optimizer, trainable, targets_per_row, steps, mesh_)
            writer = MetricsWriter(workdir_, steps, start, enabled=jax.process_index() == 0, log_every=log_every)
            try:
                return run.loop(state, start, step_fn, setup.copy_state, writer, peak_flops_per_device(peak_flops))
            finally:
                writer.close()
    finally:
        ckpt.wait()
        ckpt.close()


@dataclasses.dataclass
class _Run:
    """The loop's fixed context and its host-side state (counters, AdaLRS controller and snapshot)."""

    cfg: ModelConfig
    mesh: Mesh
    ckpt: Checkpointer
    data_iter: Any
    steps: int
    batch_size: int
    seq_len: int
    trainable: tuple[str, ...]
    targets_per_row: int
    max_consecutive_skips: int
    controller: AdaLRS | None
    snapshot: TrainState | None = None
    skipped_total: int = 0
    consecutive_skips: int = 0

    def restore(self, step: int, abstract_params: Any, abstract_opt: Any) -> tuple[TrainState, int]:
        params, opt_state, saved, snapshot = self.ckpt.restore(
            step, cfg=self.cfg, abstract_params=abstract_params, abstract_opt_state=abstract_opt,
            data_iter=self.data_iter)
        self.skipped_total, self.consecutive_skips = int(saved["skipped_total"]), int(saved["consecutive_skips"])
        if self.controller is not None and saved.get("adalrs") is not None:
            self.controller.load_state_dict(saved["adalrs"])
        if snapshot is not None:
            self.snapshot = TrainState(*snapshot)
        return TrainState(params, opt_state), int(saved["step"])

    def loop(self, state: TrainState, start: int, step_fn, copy_fn, writer: MetricsWriter,
             peak: tuple[float, str]) -> dict[str, float]:
        writer.message(f"steps {start}..{self.steps}; mesh {dict(self.mesh.shape)}; trainable "
                       f"{list(self.trainable)}; peak FLOP/s per device {peak[0]:.3g} ({peak[1]})")
        last: dict[str, float] = {}
        local_rows = self.batch_size // jax.process_count()
        with distributed.PreemptionFlag() as preempt:
            for step in range(start, self.steps):
                local = next(self.data_iter)
                check_batch(local, local_rows, self.seq_len, self.cfg)
                batch = to_global(local, self.mesh, self.batch_size)
                scale = self.controller.lr_scale() if self.controller is not None else 1.0
                t0 = time.perf_counter()
                state, out = step_fn(state, batch, np.int32(step), np.float32(scale))
                out = {k: float(v) for k, v in jax.device_get(out).items()}
                dt = time.perf_counter() - t0
                if step == start:
                    writer.message(f"first step (includes compilation): {dt:.1f}s")
                self._count_skips(out, step)
                state = self._adalrs(step, out["loss"], state, copy_fn, writer)
                flops = step_flops(self.cfg, tokens=out["tokens"], targets=out["targets"], tiles=out["tiles"],
                                   seq_len=self.seq_len, trainable=self.trainable)
                out.update(step_time_s=dt, tokens_per_s=out["tokens"] / dt, lr_scale=scale,
                           mfu=flops / dt / (peak[0] * jax.device_count()))
                if out["dropped_targets"]:
                    writer.message(f"step {step + 1}: {out['dropped_targets']:.0f} target tokens beyond the static "
                                   f"budget of {self.targets_per_row} per row (pooled over each batch shard) were "
                                   f"left out of the loss; raise train.target_fraction")
                writer.write(step + 1, out)
                last = out
                stop = distributed.any_process(preempt.requested)
                if self._save(step + 1, state, force=stop or step + 1 == self.steps):
                    writer.flush()
                if stop:
                    writer.message(f"SIGTERM: checkpointed step {step + 1} in {self.ckpt.directory}; continue "
                                   f"with --resume")
                    break
        return last

    def _adalrs(self, step: int, loss: float, state: TrainState, copy_fn, writer: MetricsWriter) -> TrainState:
        if self.controller is None:
            return state
        action = self.controller.observe(step, loss)
        if action is Action.SNAPSHOT:
            self.snapshot = copy_fn(state)
        elif action is Action.ROLLBACK:
            state, self.snapshot = self.snapshot, None
            ev = self.controller.events[-1]
            writer.message(f"step {step + 1}: AdaLRS {ev['decision']}: restored the snapshot taken after step "
                           f"{ev['snapshot_step']}; lr multiplier {ev['to']:.3g}")
        elif action is Action.RELEASE:
            self.snapshot = None
        return state

    def _save(self, done: int, state: TrainState, force: bool) -> bool:
        train_state = {"step": done, "skipped_total": self.skipped_total,
                       "consecutive_skips": self.consecutive_skips,
                       "adalrs": self.controller.state_dict() if self.controller is not None else None}
        snap = (self.snapshot.params, self.snapshot.opt_state) if self.snapshot is not None else None
        return self.ckpt.save(done, cfg=self.cfg, params=state.params, opt_state=state.opt_state,
                              train_state=train_state, data_iter=self.data_iter, snapshot=snap, force=force)

    def _count_skips(self, out: dict[str, float], step: int) -> None:
        if not out["skipped"]:
            self.consecutive_skips = 0
            return
        self.skipped_total += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            first = step + 2 - self.consecutive_skips
            raise TrainingAborted(
                f"{self.consecutive_skips} consecutive steps ({first}..{step + 1}) had a non-finite loss or "
                f"gradient (last loss {out['loss']}, grad norm {out['grad_norm']}); their updates were skipped. "
                f"Aborting: check the data of these steps or lower the learning rate "
                f"(train.max_consecutive_skips={self.max_consecutive_skips})"
            )
