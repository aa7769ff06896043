"""`train(...)`: the training loop. A plain typed function; the CLI wraps it with gin.

One run = build the mesh and the sharded train state (fresh, `init_from` a model checkpoint of ours or an upstream
directory, local or on a URL (`converters.load.initial_params`), or `resume` from the workdir's latest
checkpoint), then loop: next process-local batch -> global arrays -> jitted step (state
donated) -> metrics -> AdaLRS -> checkpoint. SIGTERM checkpoints at the next step boundary and raises `Preempted`
(`sail-jax train` exits with PREEMPTED_EXIT_CODE, so a scheduler requeues the job rather than count it done). The
learning-rate schedule (`train.steps` and the optimizer's schedule fields) is stored in every checkpoint; a resume
that changes it is refused unless `allow_schedule_change` (the rate would otherwise jump silently).
Non-finite steps are skipped by the step itself (metrics `nonfinite_step`, running total `nonfinite_steps`);
`max_consecutive_skips` in a row abort the run. Samples the data pipeline skipped are logged per reason
(`skipped_REASON`, `truncated_samples`) every `log_every` steps and on the last.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from converters.load import initial_params
from converters.orbax_io import has_tokenizer
from sail_jax.config import ModelConfig
from sail_jax.data.batch import DataFactory, batch_shards, check_batch, local_rows, to_global
from sail_jax.data.packing import skip_totals
from sail_jax.data.tokenizer import find_tokenizer_dir
from sail_jax.sharding import use_mesh
from sail_jax.training import distributed
from sail_jax.training.adalrs import Action, AdaLRS, AdaLRSConfig
from sail_jax.training.checkpointing import CheckpointConfig, Checkpointer, claim_workdir
from sail_jax.training.metrics import MetricsWriter, peak_flops_per_device, step_flops
from sail_jax.training.optim import OptimizerConfig
from sail_jax.training.program import build_program
from sail_jax.training.step import TrainState, make_loss_fn

# 128 + SIGTERM: what a shell reports for a process ended by SIGTERM; a non-zero exit tells schedulers to requeue.
PREEMPTED_EXIT_CODE = 143
# The fields that define lr(step) (and each group's multiplier of it): changing one on a resume makes the rate jump.
SCHEDULE_FIELDS = ("learning_rate", "warmup_fraction", "final_lr_fraction", "lr_scales")


class TrainingAborted(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row); the message says why."""


class Preempted(Exception):
    """SIGTERM: step (or RL episode) `step` is checkpointed (and the checkpoint complete); continue with --resume."""

    def __init__(self, step: int, directory: str, unit: str = "step"):
        super().__init__(f"SIGTERM: checkpointed {unit} {step} in {directory}; continue with --resume")


def schedule_of(steps: int, optimizer: OptimizerConfig) -> dict[str, float]:
    """The learning-rate schedule a checkpoint records (compared on resume), as it reads back from JSON."""
    return json.loads(json.dumps({"steps": steps, **{f: getattr(optimizer, f) for f in SCHEDULE_FIELDS}}))


def check_schedule(saved: dict | None, current: dict[str, float], step: int, steps_name: str = "train.steps",
                   override: str = "train.allow_schedule_change") -> None:
    """Refuse a resume whose schedule differs from the checkpoint's, naming the first changed field (`steps_name`:
    what sets the schedule's length, `override`: the binding that accepts a change)."""
    for field, value in current.items():
        old = (saved or {}).get(field, value)  # checkpoints from before the schedule was recorded: not checked
        if old != value:
            name = steps_name if field == "steps" else f"OptimizerConfig.{field}"
            raise ValueError(f"{name} changed on --resume: {old} (checkpoint {step}) -> {value}; the learning rate "
                             f"would jump. Pass --allow-schedule-change ({override}=True) to accept it")


def train(
    *,
    model: ModelConfig,
    data: DataFactory,
    workdir: str,
    steps: int | None = None,
    batch_size: int,
    seq_len: int,
    trainable: Sequence[str] = ("vision", "adapter", "llm"),
    optimizer: OptimizerConfig = OptimizerConfig(),
    adalrs: AdaLRSConfig | None = None,
    checkpoint: CheckpointConfig = CheckpointConfig(),
    mesh: dict[str, int] | None = None,
    target_fraction: float = 1.0,
    microbatches: int = 1,
    seed: int = 0,
    resume: bool = False,
    init_from: str | None = None,
    max_consecutive_skips: int = 5,
    log_every: int = 100,
    peak_flops: float | None = None,
    epochs: int | None = None,
    tokenizer_dir: str | None = None,
    eval_data: DataFactory | None = None,
    eval_every: int = 0,
    eval_batches: int = 4,
    allow_schedule_change: bool = False,
) -> dict[str, float]:
    """Train `model` for `steps` global batches of `batch_size` rows x `seq_len` tokens; returns the last metrics.

    `mesh` maps axes of (data, fsdp, tensor, expert) to sizes (-1 = the rest; default all devices on fsdp).
    `target_fraction` bounds the target positions per row that reach the lm_head (a static loss budget,
    pooled over the rows of each batch shard). `microbatches` > 1 accumulates the gradient of each step over that
    many slices of the batch (one update, equal to the whole batch's; activation memory of one slice). `epochs` is
    the number of passes over the data that `steps` stands for, shown in the log: the gin entry point
    (`gin_setup.run_length`) derives `steps` from `train.epochs` by counting the packed rows of one pass.
    `tokenizer_dir` (the data's tokenizer) is copied into every checkpoint, so each one runs on its own. Every
    `eval_every` steps (0: never) the loss on the first `eval_batches` batches of `eval_data` (a held-out set, same
    kind of factory as `data`) is logged as `eval_loss`. `allow_schedule_change` lets a resume change `steps` or
    the optimizer's schedule fields (refused otherwise).
    """
    if steps is None:
        raise ValueError("train.steps is not set: give it, or train.epochs through `sail-jax train`, which derives "
                         "the steps from the packed rows of one pass over the data")
    if eval_every < 0 or eval_batches < 1 or (eval_every and eval_data is None):
        raise ValueError(f"train.eval_every={eval_every} needs train.eval_data and train.eval_batches >= 1 "
                         f"(got {eval_batches})")
    cfg = model
    if tokenizer_dir is not None:
        tokenizer_dir = str(find_tokenizer_dir(tokenizer_dir).absolute())
        if not has_tokenizer(tokenizer_dir):
            raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer here (expected vocab.json + merges.txt)")
    program = build_program(model=cfg, batch_size=batch_size, seq_len=seq_len, steps=steps, trainable=trainable,
                            optimizer=optimizer, mesh=mesh, target_fraction=target_fraction, microbatches=microbatches)
    with claim_workdir(workdir, checkpoint) as ckpt:
        finished = False
        try:
            latest = ckpt.resumable_step(resume, "step", "train.resume")
            data_iter = data(cfg=cfg, global_batch_size=batch_size, seq_len=seq_len,
                             process_index=jax.process_index(), process_count=jax.process_count(), seed=seed)
            run = _Run(cfg=cfg, mesh=program.mesh, ckpt=ckpt, data_iter=data_iter, steps=steps,
                       batch_size=batch_size, seq_len=seq_len, trainable=program.trainable,
                       targets_per_row=program.targets_per_row, max_consecutive_skips=max_consecutive_skips,
                       tokenizer_dir=tokenizer_dir, eval_data=eval_data if eval_every else None,
                       eval_every=eval_every, eval_batches=eval_batches, seed=seed,
                       schedule=schedule_of(steps, optimizer), allow_schedule_change=allow_schedule_change,
                       controller=AdaLRS(adalrs, steps) if adalrs is not None else None)
            params = None
            if latest is None and init_from:  # our checkpoint or an upstream directory, local or on a URL
                params = initial_params(init_from, cfg, program.abstract_state.params)  # outside the mesh scope
            with use_mesh(program.mesh):
                if latest is not None:
                    state, start = run.restore(program.abstract_state)
                else:
                    if params is None:
                        params = program.init_params(jax.random.PRNGKey(seed))
                    state, start = TrainState(params, program.init_opt_state(params)), 0
                writer = MetricsWriter(ckpt.workdir, steps, start, enabled=jax.process_index() == 0,
                                       log_every=log_every)
                if epochs is not None:
                    writer.message(f"train.epochs={epochs}: {steps} steps")
                try:
                    last = run.loop(state, start, program.step, program.copy_state, writer,
                                    peak_flops_per_device(peak_flops))
                finally:
                    writer.close()
            finished = True
            if run.preempted:
                raise Preempted(run.preempted, str(ckpt.directory))  # after `finish` has completed the checkpoint
            return last
        finally:
            ckpt.finish(raise_errors=finished)  # after an error, that error is the one reported


def _warn(text: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)


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
    tokenizer_dir: str | None = None
    eval_data: DataFactory | None = None
    eval_every: int = 0
    eval_batches: int = 4
    seed: int = 0
    schedule: dict[str, float] = dataclasses.field(default_factory=dict)
    allow_schedule_change: bool = False
    preempted: int = 0  # the step checkpointed on SIGTERM
    snapshot: TrainState | None = None
    skipped_total: int = 0
    consecutive_skips: int = 0

    def restore(self, abstract_state: TrainState) -> tuple[TrainState, int]:
        """The newest checkpoint that restores (unreadable newer ones are reported and set aside)."""
        _, (params, opt_state, saved, snapshot) = self.ckpt.restore_latest(
            _warn, cfg=self.cfg, abstract_params=abstract_state.params,
            abstract_opt_state=abstract_state.opt_state, data_iter=self.data_iter)
        if not self.allow_schedule_change:
            check_schedule(saved.get("schedule"), self.schedule, int(saved["step"]))
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
        rows = local_rows(self.batch_size, jax.process_count())
        with distributed.PreemptionFlag() as preempt:
            for step in range(start, self.steps):
                local = next(self.data_iter)
                check_batch(local, rows, self.seq_len, self.cfg)
                batch = to_global(local, self.mesh, self.batch_size)
                scale = self.controller.lr_scale() if self.controller is not None else 1.0
                t0 = time.perf_counter()
                state, out = step_fn(state, batch, np.int32(step), np.float32(scale))
                out = {k: float(v) for k, v in jax.device_get(out).items()}
                out["nonfinite_step"] = out.pop("skipped")  # an update skipped for a non-finite loss or gradient
                dt = time.perf_counter() - t0
                if step == start:
                    writer.message(f"first step (includes compilation): {dt:.1f}s")
                self._count_skips(out, step)
                state = self._adalrs(step, out["loss"], state, copy_fn, writer)
                flops = step_flops(self.cfg, tokens=out["tokens"], targets=out["targets"], tiles=out["tiles"],
                                   seq_len=self.seq_len, trainable=self.trainable)
                out.update(step_time_s=dt, tokens_per_s=out["tokens"] / dt, lr_scale=scale,
                           mfu=flops / dt / (peak[0] * jax.device_count()), nonfinite_steps=self.skipped_total)
                if "deferred_rows" in local:  # rows waiting for a later batch: all shards' when balanced globally
                    out["deferred_rows"] = float(local["deferred_rows"])
                if (step + 1) % writer.log_every == 0 or step + 1 == self.steps:
                    out.update(self._data_skips())
                if out["dropped_targets"]:
                    writer.message(f"step {step + 1}: {out['dropped_targets']:.0f} target tokens beyond the static "
                                   f"budget of {self.targets_per_row} per row (pooled over each batch shard) were "
                                   f"left out of the loss; raise train.target_fraction")
                if self.eval_data is not None and (step + 1) % self.eval_every == 0:
                    out["eval_loss"] = self._eval_loss(state.params)
                writer.write(step + 1, out)
                last = out
                stop = distributed.any_process(preempt.requested)
                if self._save(step + 1, state, force=stop or step + 1 == self.steps):
                    writer.flush()
                if stop:
                    self.preempted = step + 1 if step + 1 < self.steps else 0  # the last step: the run is done
                    break
        return last

    def _eval_loss(self, params: Any) -> float:
        """Mean cross-entropy per target over the first `eval_batches` batches of the eval data (no update)."""
        data = self.eval_data(cfg=self.cfg, global_batch_size=self.batch_size, seq_len=self.seq_len,
                              process_index=jax.process_index(), process_count=jax.process_count(), seed=self.seed)
        loss_fn = _eval_loss_fn(self.cfg, self.targets_per_row, self.mesh)
        rows = local_rows(self.batch_size, jax.process_count())
        total = count = 0.0
        for _ in range(self.eval_batches):
            local = next(data)
            check_batch(local, rows, self.seq_len, self.cfg)
            _, m = loss_fn(params, to_global(local, self.mesh, self.batch_size))
            ce, n = (float(v) for v in jax.device_get((m["ce_loss"], m["targets"])))
            total, count = total + ce * n, count + n
        return total / max(count, 1.0)

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
                       "consecutive_skips": self.consecutive_skips, "schedule": self.schedule,
                       "adalrs": self.controller.state_dict() if self.controller is not None else None}
        snap = (self.snapshot.params, self.snapshot.opt_state) if self.snapshot is not None else None
        return self.ckpt.save(done, cfg=self.cfg, params=state.params, opt_state=state.opt_state,
                              train_state=train_state, data_iter=self.data_iter, snapshot=snap, force=force,
                              tokenizer=self.tokenizer_dir)

    def _data_skips(self) -> dict[str, float]:
        """Samples the data pipeline skipped so far, per reason (from its iterator state; {} for other data)."""
        get_state = getattr(self.data_iter, "get_state", None)
        return {k: float(v) for k, v in skip_totals(get_state()).items()} if get_state is not None else {}

    def _count_skips(self, out: dict[str, float], step: int) -> None:
        if not out["nonfinite_step"]:
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


@functools.lru_cache(maxsize=4)
def _eval_loss_fn(cfg: ModelConfig, targets_per_row: int, mesh: Mesh):
    """The training loss, jitted on its own (forward only), shared by the runs of one configuration."""
    return jax.jit(make_loss_fn(cfg, targets_per_row, budget_groups=batch_shards(mesh)))
