"""The RL loop: learner batch layout, rollout log-probs against the learner's, scoring, the sharded learner step,
3-episode DAPO (tiny) and GSPO (tiny-MoE) runs with dynamic sampling, exact resume after SIGKILL of `sail-jax rl`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from sail_jax.inference.engine import Request
from sail_jax.rl.learner import PolicyLossConfig, make_logprob_fn, make_update_step, pack_sequences
from sail_jax.rl.prompts import RLPrompt
from sail_jax.rl.rewards import RewardWeights
from sail_jax.rl.rollout import EncodedPrompt, RewardConfig, Rollout, score_rollouts
from tests.trainer_utils import REPO, event_tags, load_item, metrics, trees_equal

RL_GIN = str(REPO / "tests" / "data" / "rl_tiny.gin")
DAPO = str(REPO / "configs" / "rl" / "verifiable.gin")
TOKENIZER = str(REPO / "tests" / "data" / "sailvl2-tiny" / "checkpoint")


def parity_judge(question: str, response: str, answer: str) -> float:
    """A deterministic judge for "open" prompts: 1 for a response of odd length (so sampled groups are mixed)."""
    return float(len(response) % 2)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rl_prompts")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(d / "red.png")
    rows = [{"id": 1, "question": "How many squares?", "answer": "3", "kind": "count", "image": "red.png"},
            {"id": 2, "question": "Say something.", "answer": "x", "kind": "open"},
            {"id": 3, "question": "What is 1/2?", "answer": "0.5", "kind": "math"},
            {"id": 4, "question": "Describe it.", "answer": "y", "kind": "open", "image": ["red.png"]},
            "not json"]
    path = d / "prompts.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _bindings(workdir: Path, prompts: Path, *extra: str) -> list[str]:
    return [f"WORKDIR = '{workdir}'", f"PROMPTS = '{prompts}'", f"rl.tokenizer_dir = '{TOKENIZER}'", *extra]


def _run(workdir: Path, prompts: Path, *extra: str, stage: str = DAPO, files: tuple[str, ...] = (),
         resume: bool = False) -> dict:
    from sail_jax.rl import gin_setup

    gin_setup.parse([stage, RL_GIN, *files], _bindings(workdir, prompts, *extra))
    return gin_setup.rl_using_gin(resume=resume)


def test_pack_sequences_left_pads_prompts_and_aligns_responses():
    tiles = np.ones((1, 3, 4, 4), np.float32)
    b = pack_sequences([np.array([5, 6, 7]), np.array([8])], [[1, 2], [3, 4, 9]], [tiles, None], rows=3,
                       prompt_len=4, response_len=3, tile_slots=2, tile_shape=(3, 4, 4), pad_id=0)
    np.testing.assert_array_equal(b["input_ids"], [[0, 5, 6, 7, 1, 2, 0], [0, 0, 0, 8, 3, 4, 9], [0] * 7])
    np.testing.assert_array_equal(b["segment_ids"], [[0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1], [1] * 7])
    np.testing.assert_array_equal(b["positions"][:2], [[0, 0, 1, 2, 3, 4, 4], [0, 0, 0, 0, 1, 2, 3]])
    np.testing.assert_array_equal(b["response_mask"], [[1, 1, 0], [1, 1, 1], [0, 0, 0]])  # filler row: nothing
    np.testing.assert_array_equal(b["tile_mask"], [[True, False], [False, False], [False, False]])
    with pytest.raises(ValueError, match="does not fit"):
        pack_sequences([np.arange(5)], [[1]], [None], rows=1, prompt_len=4, response_len=3, tile_slots=0,
                       tile_shape=(3, 4, 4), pad_id=0)


def _rollout(text: str, answer: str, kind: str, n_tokens: int, finish: str = "stop") -> Rollout:
    prompt = EncodedPrompt(RLPrompt("p", "question?", answer, kind), Request(np.zeros(3, np.int32)))
    return Rollout(prompt, 0, list(range(n_tokens)), finish, text)


def test_score_rollouts_parts_and_overlong_shaping():
    rollouts = [_rollout("<think>two and one</think>\\boxed{3}", "3", "count", 4),
                _rollout("<think>half</think> so \\boxed{\\frac{1}{2}}", "0.5", "math", 8),
                _rollout("no idea", "B", "mcq", 10, "length"),
                _rollout("odd", "x", "open", 2)]
    weights = RewardWeights(answer=0.5, think=0.25, format=0.25)
    s = score_rollouts(rollouts, RewardConfig(weights=weights, overlong_buffer=4), max_new_tokens=10,
                       judge=parity_judge)
    np.testing.assert_array_equal(s.accuracy, [1, 1, 0, 1])  # open: the judge's score
    np.testing.assert_array_equal(s.format, [1, 1, 0, 0])
    np.testing.assert_array_equal(s.think, [1, 0, 1, 1])  # the judge scores think quality too (odd lengths)
    np.testing.assert_allclose(s.overlong, [0, -0.5, -1, 0])  # free up to 6 tokens, -1 at 10
    np.testing.assert_allclose(s.reward, [1.0, 0.75 - 0.5, 0.25 - 1, 0.75])
    np.testing.assert_array_equal(s.truncated, [False, False, True, False])
    with pytest.raises(ValueError, match="needs a judge"):
        score_rollouts(rollouts[:1], RewardConfig(weights=weights), max_new_tokens=10)


@pytest.mark.parametrize("stage", ["verifiable", "verifiable_moe", "mixed"])
def test_stage_configs_resolve(stage, prompts):
    from sail_jax.rl import gin_setup

    files = [str(REPO / "configs" / "rl" / f"{stage}.gin"), str(REPO / "configs" / "model" / "2b.gin")]
    bindings = _bindings(Path("/unused"), prompts)
    if stage == "mixed":
        gin_setup.parse(files, bindings)
        with pytest.raises(ValueError, match="RewardConfig.judge is not set"):
            gin_setup.rl_arguments()
        bindings.append("RewardConfig.judge = 'tests.test_rl_loop:parity_judge'")
    gin_setup.parse(files, bindings)
    args = gin_setup.rl_arguments()
    loss, rewards = args["loss"], args["rewards"]
    assert args["prompts_per_episode"] * args["samples_per_prompt"] == 2048
    assert args["optimizer"].learning_rate == 1e-6 and loss.kl_coef == 0
    assert (loss.level, loss.clip_low, loss.clip_high, loss.agg) == (
        ("sequence", 3e-4, 4e-4, "seq-mean-token-mean") if stage == "verifiable_moe"
        else ("token", 0.20, 0.28, "token-mean"))
    assert rewards.weights.answer == (0.7 if stage == "mixed" else 1.0)
    gin_setup.parse(files, [*bindings, "PolicyLossConfig.clip_high = 'wide'"])
    with pytest.raises(ValueError, match="PolicyLossConfig.clip_high"):
        gin_setup.rl_arguments()


def test_rl_cli_names_a_missing_macro_and_creates_nothing(tmp_path, capsys):
    from sail_jax.cli import main

    workdir = tmp_path / "run"
    rc = main(["rl", f"--gin_file={DAPO}", f"--gin_file={RL_GIN}", f"--gin.WORKDIR='{workdir}'"])
    assert rc == 2 and not workdir.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sail-jax rl: error: required gin macro(s) not set: PROMPTS (set them in a --gin-file or with "
                   "--gin.PROMPTS=...)"]


@pytest.fixture(scope="module")
def tiny():
    """The tests' tiny model (rl_tiny.gin's shapes), random weights, its processor."""
    import flax.linen as nn
    import gin

    from sail_jax.data.processor import SailProcessor
    from sail_jax.models.sail_vl import SailVL, dummy_inputs
    from sail_jax.rl import gin_setup
    from sail_jax.training import gin_setup as train_gin

    gin_setup.parse([DAPO, RL_GIN], _bindings(Path("/unused"), Path("/unused")))
    cfg = train_gin.model_config(**gin.get_bindings("model_config"))
    params = nn.unbox(jax.jit(SailVL(cfg).init)(jax.random.PRNGKey(0), *dummy_inputs(cfg)))["params"]
    return cfg, params, SailProcessor.from_dir(TOKENIZER, max_num=1, image_size=cfg.vision.image_size)


def test_rollout_logprobs_match_the_learner(tiny, prompts):
    from sail_jax.inference.engine import Engine
    from sail_jax.inference.sampling import SamplingParams
    from sail_jax.models.sail_vl import SailVL
    from sail_jax.rl.prompts import read_prompts
    from sail_jax.rl.rollout import encode_prompt, generate_rollouts

    cfg, params, processor = tiny
    data = read_prompts(prompts)
    assert data.skipped == {"malformed": 1}
    encoded = [encode_prompt(processor, p) for p in data.prompts[:2]]
    assert encoded[0].pixel_values is not None and encoded[1].pixel_values is None
    engine = Engine(SailVL(cfg), {"params": params})
    sampling = SamplingParams(max_new_tokens=6, temperature=0.7, seed=3)
    rolls = generate_rollouts(engine, processor, encoded, n=2, sampling=sampling, with_logprobs=True)
    assert [r.group for r in rolls] == [0, 0, 1, 1] and all(len(r.response_ids) == 6 for r in rolls)
    again = generate_rollouts(engine, processor, encoded, n=2, sampling=sampling)
    assert [r.response_ids for r in again] == [r.response_ids for r in rolls]  # seeded: replays exactly
    batch = pack_sequences([r.prompt.input_ids for r in rolls], [r.response_ids for r in rolls],
                           [r.prompt.pixel_values for r in rolls], rows=4, prompt_len=64, response_len=6,
                           tile_slots=1, tile_shape=(3, 56, 56), pad_id=0)
    learner = np.asarray(jax.jit(make_logprob_fn(cfg, 0.7))(params, batch))
    np.testing.assert_allclose(learner, np.stack([r.sample_logp for r in rolls]), atol=2e-4)


def test_learner_step_sharded_equals_single_device(tiny):
    """The token mean is over the whole mini-batch: a step on a 2-way data-parallel mesh equals one device's."""
    from sail_jax.data.batch import batch_sharding
    from sail_jax.sharding import make_mesh, use_mesh
    from sail_jax.training.optim import OptimizerConfig, make_optimizer, make_schedule
    from sail_jax.training.step import TrainState

    cfg, params, _ = tiny
    rng = np.random.default_rng(0)
    # rows with very different response lengths: a mean of per-device means would differ from the global mean
    batch = pack_sequences([rng.integers(0, 1000, 5), rng.integers(0, 1000, 3), rng.integers(0, 1000, 4),
                            rng.integers(0, 1000, 2)], [[1], [2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12]],
                           [None] * 4, rows=4, prompt_len=6, response_len=5, tile_slots=0, tile_shape=(3, 56, 56),
                           pad_id=0)
    batch["old_logp"] = np.full((4, 5), -11.9, np.float32)
    batch["ref_logp"] = np.full((4, 5), -12.0, np.float32)
    batch["advantages"] = np.array([1.0, -0.5, 0.25, -1.0], np.float32)
    opt = OptimizerConfig(learning_rate=1e-2, warmup_fraction=0.0)
    tx = make_optimizer(opt, params, ("llm",))
    step = make_update_step(cfg, tx, make_schedule(opt, 10), ("llm",), PolicyLossConfig(entropy_coef=0.01, kl_coef=0.1),
                            1.0)
    results = []
    for devices in (1, 2):
        mesh = make_mesh(data=devices)
        with use_mesh(mesh):
            dev = {k: jax.device_put(v, batch_sharding(mesh, v.shape)) for k, v in batch.items()}
            replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
            state, m = jax.jit(step)(TrainState(replicated, tx.init(replicated)), dev, jnp.int32(0))
            results.append((jax.device_get(state.params), jax.device_get(m)))
    (p1, m1), (p2, m2) = results
    assert m1["response_tokens"] == 12
    assert m1["kl_ref"] > 0 and np.isclose(m1["loss"], m1["pg_loss"] - 0.01 * m1["entropy"] + 0.1 * m1["kl_ref"])
    for k in ("loss", "entropy", "approx_kl", "kl_ref", "grad_norm"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p1, p2)  # Adam amplifies rounding
    assert not trees_equal(p1, params)


@pytest.fixture(scope="module")
def dapo_run(tmp_path_factory, prompts) -> Path:
    workdir = tmp_path_factory.mktemp("rl_dapo") / "run"
    _run(workdir, prompts)
    return workdir


def test_dapo_three_episodes_with_dynamic_sampling(dapo_run):
    rows = metrics(dapo_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["batch_full"] == 1 and r["kept_rollouts"] == 8  # dynamic sampling filled the batch
        assert r["groups_kept"] == 2 and r["groups_seen"] == 2 * r["gen_rounds"]
        assert r["dropped_all_correct"] + r["dropped_all_wrong"] + r["groups_kept"] + r["surplus_groups"] \
            == r["groups_seen"]
        assert r["logprob_max_abs_diff"] < 1e-3  # engine vs trainer forward
        assert r["updates"] == 2 * r["step"] and r["skipped_updates"] == 0
        for k in ("reward_mean", "reward_format", "reward_overlong", "accuracy", "entropy",
                  "clip_frac_high", "clip_frac_low", "approx_kl", "response_len_mean", "response_len_max",
                  "truncated_frac", "time_rollout_s", "time_logprob_s", "time_update_s"):
            assert np.isfinite(r[k]), k
    assert sum(r["dropped_all_correct"] + r["dropped_all_wrong"] for r in rows) > 0  # count/math all wrong
    assert event_tags(dapo_run)["train/reward_mean"] == 3
    assert not trees_equal(load_item(dapo_run, 1, "params"), load_item(dapo_run, 3, "params"))


def test_an_episode_with_every_group_dropped_makes_no_update(dapo_run, tmp_path):
    """Math prompts a random model never solves: every group is all wrong, the batch stays empty, no step runs."""
    prompts = tmp_path / "math.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "question": f"What is {i}+{i}?", "answer": str(2 * i),
                                           "kind": "math"}) + "\n" for i in range(3)))
    workdir = tmp_path / "run"
    last = _run(workdir, prompts, "rl.max_gen_rounds = 2")
    assert np.isnan(last["loss"]) and last["updates"] == 0
    assert [(r["kept_rollouts"], r["dropped_all_wrong"], r["batch_full"]) for r in metrics(workdir)] == [(0, 4, 0)] * 3
    assert trees_equal(load_item(workdir, 1, "params"), load_item(workdir, 3, "params"))


def _rl_env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=8"))
    return e


def test_resume_after_sigkill_matches_the_uninterrupted_run(dapo_run, prompts, tmp_path):
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "sail_jax", "rl", f"--gin_file={DAPO}", f"--gin_file={RL_GIN}",
            *(f"--gin_bindings={b}" for b in _bindings(workdir, prompts))]
    log = tmp_path / "rl.log"
    with log.open("w") as f:
        proc = subprocess.Popen(args, env=_rl_env(), stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    ckpts = workdir / "checkpoints"
    t0 = time.monotonic()
    while not (ckpts / "1").is_dir():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() - t0 < 300, "timed out waiting for the first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpts / "3").is_dir(), "the run finished before it was killed"
    _run(workdir, prompts, resume=True)
    for item in ("params", "opt_state"):
        assert trees_equal(load_item(workdir, 3, item), load_item(dapo_run, 3, item)), item
    assert load_item(workdir, 3, "train_state") == load_item(dapo_run, 3, "train_state")
    assert [r["reward_mean"] for r in metrics(workdir)] == [r["reward_mean"] for r in metrics(dapo_run)]


def test_sigterm_checkpoints_the_episode_and_a_changed_schedule_is_refused(dapo_run, prompts, tmp_path,
                                                                           monkeypatch):
    """SIGTERM (a real signal, sent after the first episode) checkpoints that episode and raises Preempted (the CLI's
    exit 143); a resume that changes the number of optimizer updates is refused; an unchanged one replays the
    uninterrupted run."""
    from sail_jax.rl import loop
    from sail_jax.training.trainer import Preempted

    run = loop._Episode.run

    def run_then_sigterm(self, state, episode, updates_done):
        out = run(self, state, episode, updates_done)
        if episode == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop._Episode, "run", run_then_sigterm)
    workdir = tmp_path / "run"
    with pytest.raises(Preempted, match="SIGTERM: checkpointed episode 1 in .*; continue with --resume"):
        _run(workdir, prompts)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"rl.episodes x mini_batches x update_epochs \(optimizer updates\) changed "
                                         r"on --resume: 6 \(checkpoint 1\) -> 8;.*rl.allow_schedule_change=True"):
        _run(workdir, prompts, "rl.episodes = 4", resume=True)
    _run(workdir, prompts, resume=True)
    assert trees_equal(load_item(workdir, 3, "params"), load_item(dapo_run, 3, "params"))


def test_init_from_a_workdir_starts_from_its_newest_step(dapo_run, prompts, tmp_path):
    """`rl.init_from` takes a run's workdir as `train.init_from` does (its newest finalised step)."""
    workdir = tmp_path / "run"
    last = _run(workdir, prompts, f"rl.init_from = '{dapo_run}'", "rl.episodes = 1")
    assert last["logprob_max_abs_diff"] < 1e-3 and last["updates"] == 2


def test_gspo_on_tiny_moe(tmp_path):
    """Text-only prompts (the DAPO run covers images): the learner batch has no tile slots, no ViT compiles."""
    prompts = tmp_path / "text.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "question": q, "answer": "x", "kind": "open"}) + "\n"
                               for i, q in enumerate(["Say something.", "Describe it.", "Go on."])))
    workdir = tmp_path / "moe"
    last = _run(workdir, prompts, "rl.dynamic_sampling = False", "rl.episodes = 3", "rl.mini_batches = 1",
                stage=str(REPO / "configs" / "rl" / "verifiable_moe.gin"),
                files=(str(REPO / "configs" / "model" / "tiny-moe.gin"),))
    rows = metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["gen_rounds"] == 1 and r["kept_rollouts"] == 8 for r in rows)  # no filter: the whole round
    assert last["aux_loss"] > 0 and np.isfinite(last["loss"])  # the MoE router loss is part of the objective
    assert last["expert_max_load"] >= 1 and last["expert_entropy"] > 0  # load x E: 1 = balanced
    # GSPO's sequence ratio stays within the tiny clip range only if the policy barely moved: clipping is counted
    assert 0 <= last["clip_frac_high"] + last["clip_frac_low"] <= 1
    assert not trees_equal(load_item(workdir, 1, "params"), load_item(workdir, 3, "params"))


def filter_judge(question: str, response: str, answer: str) -> float:
    """"always" answers are always right; the others as `parity_judge`."""
    return 1.0 if answer == "always" else parity_judge(question, response, answer)


def test_keep_prompt_rule():
    from sail_jax.rl.pass_filter import keep_prompt

    assert [keep_prompt("math", p) for p in (0.0, 0.25, 1.0)] == [False, True, False]
    assert [keep_prompt("mcq", p) for p in (0.0, 0.25, 1.0)] == [True, True, False]
    assert keep_prompt("mcq", 0.0, reasoning_kinds=("mcq",)) is False


def test_rl_filter_writes_pass_at_k(dapo_run, tmp_path):
    from sail_jax.cli import main

    rows = [{"id": "m", "question": "What is 2+2?", "answer": "4", "kind": "math"},
            {"id": "c", "question": "Options: (A) 1 (B) 2", "answer": "B", "kind": "mcq"},
            {"id": "a", "question": "Anything.", "answer": "always", "kind": "open"},
            {"id": "o", "question": "Say it.", "answer": "x", "kind": "open"}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    out = tmp_path / "kept.jsonl"
    rc = main(["rl-filter", "--checkpoint", str(dapo_run / "checkpoints" / "3"), "--data", str(data), "--k", "4",
               "--out", str(out), "--max-new-tokens", "6", "--judge", "tests.test_rl_loop:filter_judge"])
    assert rc == 0
    scores = {r["id"]: r for r in map(json.loads, Path(f"{out}.passk.jsonl").read_text().splitlines())}
    assert set(scores) == {"m", "c", "a", "o"}
    assert scores["m"]["pass_at_k"] == 0 and not scores["m"]["kept"]  # a random model never solves it
    assert scores["c"]["pass_at_k"] == 0 and scores["c"]["kept"]  # not a reasoning kind: only pass@k = 1 drops
    assert scores["a"]["pass_at_k"] == 1 and not scores["a"]["kept"]
    assert scores["o"]["pass_at_k"] in (0, 0.25, 0.5, 0.75, 1)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in kept] == [i for i in ("m", "c", "a", "o") if scores[i]["kept"]]
    assert all(r["pass_at_k"] == scores[r["id"]]["pass_at_k"] and r["question"] for r in kept)
