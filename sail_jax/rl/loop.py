"""`rl(...)`: the RL post-training loop (DAPO for dense models, GSPO for MoE). A plain typed function; the CLI wraps
it with gin (`sail_jax.rl.gin_setup`).

One episode: draw `prompts_per_episode` prompts -> the engine samples `samples_per_prompt` completions of each
(on the learner's own parameters, no host copy) -> rewards -> with dynamic sampling, groups whose answers are all
right or all wrong are dropped and more prompts are drawn until the batch is full or `max_gen_rounds` rounds ran ->
group advantages -> old-policy (and reference) log-probs by the trainer's forward -> `update_epochs` passes of
`mini_batches` optimizer steps. A short batch is padded with empty rows (no response tokens), so every mini-batch
keeps one compiled shape. Randomness is a function of (seed, episode, round) and the prompt order of (seed, pass),
so a resumed run (params, optimizer, prompt position and episode counter from the checkpoint) replays exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from converters.load import initial_params as load_initial_params
from converters.orbax_io import checkpoint_tokenizer, resolve_checkpoint
from sail_jax.config import PAD_TOKEN_ID, ModelConfig
from sail_jax.data.batch import batch_sharding
from sail_jax.data.processor import SailProcessor
from sail_jax.inference.engine import Engine
from sail_jax.inference.sampling import SamplingParams
from sail_jax.models.sail_vl import SailVL
from sail_jax.rl.advantages import group_advantages
from sail_jax.rl.dynamic_sampling import GroupBatch, fill_batch
from sail_jax.rl.judge import make_judge
from sail_jax.rl.learner import PolicyLossConfig, make_logprob_fn, make_update_step, pack_sequences
from sail_jax.rl.prompts import read_prompts
from sail_jax.rl.rollout import RewardConfig, encode_prompt, generate_rollouts, score_rollouts
from sail_jax.sharding import use_mesh
from sail_jax.training import distributed
from sail_jax.training.checkpointing import CheckpointConfig, claim_workdir
from sail_jax.training.metrics import MetricsWriter
from sail_jax.training.optim import OptimizerConfig, make_schedule
from sail_jax.training.program import build_program
from sail_jax.training.step import TrainState
from sail_jax.training.trainer import Preempted, check_schedule, schedule_of


class PromptIterator:
    """Endless prompt indices: each pass over the file in its own shuffled order (seeded by (seed, pass)).
    `get_state`/`set_state` make it a checkpointable iterator (the Checkpointer's `data_iter`)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.index = n, seed, 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        out, order = [], self._order()
        while len(out) < k:
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            out.append(int(order[self.index]))
            self.index += 1
        return out

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "n": self.n, "seed": self.seed}

    def set_state(self, state: dict[str, int]) -> None:
        if state.get("n") != self.n:
            raise ValueError(f"the checkpoint's prompt iterator covers {state.get('n')} prompts; the prompt file "
                             f"now has {self.n}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


@functools.lru_cache(maxsize=8)
def learner_functions(cfg: ModelConfig, opt: OptimizerConfig, trainable: tuple[str, ...], loss: PolicyLossConfig,
                      temperature: float, total_updates: int, mesh: tuple[tuple[str, int], ...] | None, rows: int,
                      seq_len: int):
    """(program, jitted update, jitted log-prob) of one configuration, shared by the runs of a process (and by
    benchmarks/rl.py, which times an episode's parts with them): `program` holds the mesh, shardings, optimizer and
    `init_opt_state`; `update(state, batch, step)` donates the state; `logprob(params, batch)` gives old-policy
    log-probs. `rows` is the mini-batch size, `seq_len` = prompt + response columns, `mesh` sorted (axis, size)
    pairs (hashable: the arguments key the cache)."""
    program = build_program(model=cfg, batch_size=rows, seq_len=seq_len, steps=total_updates, trainable=trainable,
                            optimizer=opt, mesh=dict(mesh) if mesh is not None else None)
    update = make_update_step(cfg, program.tx, make_schedule(opt, total_updates), program.trainable, loss,
                              temperature)
    return (program, jax.jit(update, out_shardings=(program.shardings, None), donate_argnums=0),
            jax.jit(make_logprob_fn(cfg, temperature)))


def to_device(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """A learner batch on `mesh`, its rows sharded over the data-parallel axes."""
    return {k: jax.device_put(v, batch_sharding(mesh, v.shape)) for k, v in batch.items()}


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def initial_params(init_from: str | None, cfg: ModelConfig, program: Any, seed: int) -> Any:
    """The policy to start from: a sail-jax or upstream checkpoint, else random (seeded) weights. Call it outside
    the mesh scope (the upstream converter builds its abstract tree without one)."""
    if init_from is None:
        with use_mesh(program.mesh):
            return program.init_params(jax.random.PRNGKey(seed))
    return load_initial_params(init_from, cfg, program.abstract_state.params)


def rl(
    *,
    model: ModelConfig,
    workdir: str,
    prompts: str,
    episodes: int,
    prompts_per_episode: int,
    samples_per_prompt: int,
    max_prompt_len: int,
    max_new_tokens: int,
    init_from: str | None = None,
    tokenizer_dir: str | None = None,
    image_root: str | None = None,
    max_tiles: int = 1,
    system: str | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    mini_batches: int = 1,
    update_epochs: int = 1,
    loss: PolicyLossConfig = PolicyLossConfig(),
    rewards: RewardConfig = RewardConfig(),
    scale_by_std: bool = True,
    dynamic_sampling: bool = True,
    max_gen_rounds: int = 3,
    optimizer: OptimizerConfig = OptimizerConfig(),
    checkpoint: CheckpointConfig = CheckpointConfig(),
    trainable: Sequence[str] = ("adapter", "llm"),
    mesh: dict[str, int] | None = None,
    decode_steps: int = 8,
    logprob_check: bool = True,
    seed: int = 0,
    resume: bool = False,
    allow_schedule_change: bool = False,
    log_every: int = 1,
) -> dict[str, float]:
    """Run `episodes` RL episodes into `workdir` (checkpoints/, metrics.jsonl, tensorboard/); returns the last
    episode's metrics. Each episode's batch is prompts_per_episode x samples_per_prompt rollouts, split into
    `mini_batches` optimizer steps per pass; prompts (image tokens included) must fit `max_prompt_len` tokens.
    `init_from`: a checkpoint step, a workdir (its newest finalised step) or an upstream directory. The learning-rate
    schedule (episodes x mini_batches x update_epochs updates) is fixed for a run: a resume that changes it is refused
    unless `allow_schedule_change`. SIGTERM checkpoints the current episode and raises `trainer.Preempted`."""
    if model.vision.anyres:
        raise ValueError("rl: AnyRes models are not supported by the RL learner (sail-jax rl-filter and the engine "
                         "are); use a fixed-tile model")
    if min(episodes, prompts_per_episode, samples_per_prompt, mini_batches, update_epochs, max_gen_rounds) < 1:
        raise ValueError("rl: episodes, prompts_per_episode, samples_per_prompt, mini_batches, update_epochs and "
                         "max_gen_rounds must all be >= 1")
    rows_total = prompts_per_episode * samples_per_prompt
    if rows_total % mini_batches:
        raise ValueError(f"rl: {rows_total} rollouts per episode do not split into {mini_batches} mini-batches")
    rows = rows_total // mini_batches
    init_from = resolve_checkpoint(init_from) if init_from else None
    tokenizer_dir = tokenizer_dir or (str(checkpoint_tokenizer(init_from) or "") if init_from else None)
    if not tokenizer_dir:
        raise ValueError("rl.tokenizer_dir is not set and rl.init_from carries no tokenizer")
    cfg = model
    data = read_prompts(prompts, image_root)
    processor = SailProcessor.from_dir(tokenizer_dir, max_num=max_tiles, image_size=cfg.vision.image_size)
    images_per_prompt = max(len(p.images) for p in data.prompts)
    tile_slots = images_per_prompt * (max_tiles + (max_tiles > 1))  # + the thumbnail of a tiled image
    total_updates = episodes * mini_batches * update_epochs
    schedule = schedule_of(total_updates, optimizer)
    program, update, logprob = learner_functions(cfg, optimizer, tuple(trainable), loss, float(temperature),
                                                 total_updates, tuple(sorted(mesh.items())) if mesh else None, rows,
                                                 max_prompt_len + max_new_tokens)
    judge = make_judge(rewards.judge, timeout_s=rewards.judge_timeout_s, max_retries=rewards.judge_max_retries) \
        if rewards.judge else None
    it = PromptIterator(len(data.prompts), seed)
    with claim_workdir(workdir, checkpoint) as ckpt:
        finished = False
        try:
            latest = ckpt.resumable_step(resume, "episode", "rl.resume")
            fresh = latest is None
            params = initial_params(init_from, cfg, program, seed) if fresh else None
            reference = initial_params(init_from, cfg, program, seed) if loss.kl_coef else None
            with use_mesh(program.mesh):
                start, updates_done = 0, 0
                if not fresh:
                    _, (params, opt_state, saved, _) = ckpt.restore_latest(
                        _warn, cfg=cfg, abstract_params=program.abstract_state.params,
                        abstract_opt_state=program.abstract_state.opt_state, data_iter=it)
                    if not allow_schedule_change:
                        check_schedule(saved.get("schedule"), schedule, int(saved["episode"]),
                                       "rl.episodes x mini_batches x update_epochs (optimizer updates)",
                                       "rl.allow_schedule_change")
                    state = TrainState(params, opt_state)
                    start, updates_done = int(saved["episode"]), int(saved["updates"])
                else:
                    state = TrainState(params, program.init_opt_state(params))
                ep = _Episode(cfg=cfg, processor=processor, data=data, it=it, program=program, update=update,
                              logprob=logprob, judge=judge, rewards=rewards, rows=rows, prompt_len=max_prompt_len,
                              tile_slots=tile_slots, mini_batches=mini_batches, update_epochs=update_epochs,
                              n=samples_per_prompt, prompts_per_episode=prompts_per_episode, system=system,
                              sampling=dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p),
                              dynamic_sampling=dynamic_sampling, max_gen_rounds=max_gen_rounds,
                              scale_by_std=scale_by_std, decode_steps=decode_steps, logprob_check=logprob_check,
                              seed=seed, reference=reference)
                writer = MetricsWriter(ckpt.workdir, episodes, start, enabled=jax.process_index() == 0,
                                       log_every=log_every)
                last: dict[str, float] = {}
                preempted = 0
                try:
                    with distributed.PreemptionFlag() as preempt:
                        for episode in range(start, episodes):
                            state, last, updates_done = ep.run(state, episode, updates_done)
                            writer.write(episode + 1, last)
                            stop = distributed.any_process(preempt.requested)
                            saved = ckpt.save(episode + 1, cfg=cfg, params=state.params, opt_state=state.opt_state,
                                              train_state={"episode": episode + 1, "updates": updates_done,
                                                           "schedule": schedule},
                                              data_iter=it, force=stop or episode + 1 == episodes,
                                              tokenizer=tokenizer_dir)
                            if saved:
                                writer.flush()
                            if stop:
                                preempted = episode + 1 if episode + 1 < episodes else 0  # the last: done
                                break
                finally:
                    writer.close()
            finished = True
        finally:
            ckpt.finish(raise_errors=finished)
        if preempted:
            raise Preempted(preempted, str(ckpt.directory), "episode")  # after `finish` completed the checkpoint
        return last


@dataclasses.dataclass
class _Episode:
    """The fixed context of a run's episodes; `run` does one."""

    cfg: ModelConfig
    processor: SailProcessor
    data: Any
    it: PromptIterator
    program: Any
    update: Any
    logprob: Any
    judge: Any
    rewards: RewardConfig
    rows: int
    prompt_len: int
    tile_slots: int
    mini_batches: int
    update_epochs: int
    n: int
    prompts_per_episode: int
    system: str | None
    sampling: dict
    dynamic_sampling: bool
    max_gen_rounds: int
    scale_by_std: bool
    decode_steps: int
    logprob_check: bool
    seed: int
    reference: Any = None

    def collect(self, engine: Engine, episode: int) -> tuple[GroupBatch, list]:
        """The episode's kept groups (dynamic sampling) and the scores of every generated round."""
        rounds = []

        def generate(r: int):
            prompts = [encode_prompt(self.processor, self.data.prompts[i], self.system)
                       for i in self.it.take(self.prompts_per_episode)]
            for p in prompts:
                if len(p.input_ids) > self.prompt_len:
                    raise ValueError(f"prompt {p.prompt.id!r}: {len(p.input_ids)} tokens (image tokens included), "
                                     f"more than rl.max_prompt_len={self.prompt_len}")
            sampling = SamplingParams(**self.sampling, seed=int(np.random.default_rng(
                [self.seed, episode, r]).integers(2**31)))
            rollouts = generate_rollouts(engine, self.processor, prompts, n=self.n, sampling=sampling,
                                         with_logprobs=self.logprob_check)
            scores = score_rollouts(rollouts, self.rewards, self.sampling["max_new_tokens"], self.judge)
            rounds.append(scores)
            samples = [(ro, float(rw)) for ro, rw in zip(rollouts, scores.reward, strict=True)]
            # without dynamic sampling every group is kept: an accuracy of 0.5 passes the filter
            accuracy = scores.accuracy if self.dynamic_sampling else np.full(len(rollouts), 0.5)
            return samples, accuracy, [ro.group for ro in rollouts]

        batch = fill_batch(generate, target_groups=self.prompts_per_episode,
                           max_gen_rounds=self.max_gen_rounds if self.dynamic_sampling else 1)
        return batch, rounds

    def run(self, state: TrainState, episode: int, updates_done: int) -> tuple[TrainState, dict[str, float], int]:
        t0 = time.perf_counter()
        engine = Engine(SailVL(self.cfg), {"params": state.params}, mesh=self.program.mesh,
                        decode_steps=self.decode_steps)
        batch, rounds = self.collect(engine, episode)
        del engine
        t_rollout = time.perf_counter() - t0

        samples = batch.samples
        adv = group_advantages([rw for _, rw in samples], batch.group_ids, scale_by_std=self.scale_by_std) \
            if samples else np.zeros(0, np.float32)
        minis, delta = [], 0.0
        # A mini-batch with no rollout (dynamic sampling came up short) gets no optimizer step: a zero gradient
        # would still move the parameters through Adam's momentum and weight decay.
        for j in range(-(-len(samples) // self.rows)):
            part = samples[j * self.rows:(j + 1) * self.rows]
            host = pack_sequences([ro.prompt.input_ids for ro, _ in part], [ro.response_ids for ro, _ in part],
                                  [ro.prompt.pixel_values for ro, _ in part], rows=self.rows,
                                  prompt_len=self.prompt_len, response_len=self.sampling["max_new_tokens"],
                                  tile_slots=self.tile_slots,
                                  tile_shape=(3, self.cfg.vision.image_size, self.cfg.vision.image_size),
                                  pad_id=PAD_TOKEN_ID if PAD_TOKEN_ID < self.cfg.llm.vocab_size else 0)
            a = np.zeros(self.rows, np.float32)
            a[:len(part)] = adv[j * self.rows:j * self.rows + len(part)]
            host["advantages"] = a
            dev = to_device(host, self.program.mesh)
            dev["old_logp"] = self.logprob(state.params, dev)
            if self.reference is not None:
                dev["ref_logp"] = self.logprob(self.reference, dev)
            if self.logprob_check:
                delta = max(delta, _max_logprob_delta(np.asarray(dev["old_logp"]), part))
            minis.append(dev)
        jax.block_until_ready(minis)
        t_logprob = time.perf_counter() - t0 - t_rollout

        step_metrics = []
        for _ in range(self.update_epochs):
            for dev in minis:
                state, m = self.update(state, dev, np.int32(updates_done))
                step_metrics.append(m)
                updates_done += 1
        step_metrics = jax.device_get(step_metrics)
        t_update = time.perf_counter() - t0 - t_rollout - t_logprob
        if step_metrics:
            out = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
            out["skipped_updates"] = out.pop("skipped") * len(step_metrics)
        else:  # every group was dropped: nothing to learn from this episode
            out = {"loss": float("nan"), "lr": float("nan"), "skipped_updates": 0.0}
        out.update(_rollout_metrics(rounds, batch))
        total = time.perf_counter() - t0
        out.update(logprob_max_abs_diff=delta if self.logprob_check else float("nan"), time_rollout_s=t_rollout,
                   time_logprob_s=t_logprob, time_update_s=t_update, episode_time_s=total,
                   tokens_per_s=float(sum(s.length.sum() for s in rounds)) / max(t_rollout, 1e-9),
                   mfu=float("nan"), updates=float(updates_done))
        if self.judge is not None:
            out["judge_failures"] = float(self.judge.failures)
        return state, out, updates_done


def _max_logprob_delta(old_logp: np.ndarray, part: list) -> float:
    """max |engine log-prob - learner log-prob| over the response tokens of the mini-batch's rows."""
    worst = 0.0
    for i, (ro, _) in enumerate(part):
        if ro.sample_logp is None or not len(ro.response_ids):
            continue
        learner = old_logp[i, :len(ro.response_ids)]
        worst = max(worst, float(np.max(np.abs(learner - ro.sample_logp))))
    return worst


def _rollout_metrics(rounds: list, batch: GroupBatch) -> dict[str, float]:
    """Reward and its parts, accuracy, response lengths over every generated rollout; dynamic-sampling counts."""
    cat = lambda name: np.concatenate([getattr(s, name) for s in rounds]).astype(np.float64)
    length = cat("length")
    kept = [rw for _, rw in batch.samples]
    return {"reward_mean": float(cat("reward").mean()), "reward_think": float(cat("think").mean()),
            "reward_format": float(cat("format").mean()),
            "reward_overlong": float(cat("overlong").mean()), "accuracy": float(cat("accuracy").mean()),
            "response_len_mean": float(length.mean()), "response_len_max": float(length.max()),
            "truncated_frac": float(cat("truncated").mean()), "kept_rollouts": float(len(kept)),
            "kept_reward_mean": float(np.mean(kept)) if kept else 0.0,
            **{k: float(v) for k, v in batch.stats().items()}}
