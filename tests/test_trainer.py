"""The trainer end to end, in this process: several short runs of one tiny config share one compiled step.

`base` is a plain 6-step run (vision frozen, checkpoint every step); the other runs differ only in data or
host-side settings, so their checkpoints can be compared bit for bit with the base run's.
"""

from __future__ import annotations

import math
import re

import pytest

from sail_jax.cli import main
from sail_jax.training import gin_setup
from sail_jax.training.trainer import TrainingAborted
from tests.trainer_utils import TINY_GIN, event_tags, load_item, metrics, trees_equal


def run_train(workdir, *bindings: str, resume: bool = False) -> dict:
    gin_setup.parse([TINY_GIN], [f"WORKDIR = '{workdir}'", *bindings])
    return gin_setup.train_using_gin(resume=resume)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    out = {name: root / name for name in ("base", "nan", "adalrs")}
    # The base run goes through the command line (stacked gin file + --gin.NAME=VALUE).
    assert main(["train", f"--gin_file={TINY_GIN}", f"--gin.WORKDIR='{out['base']}'"]) == 0
    run_train(out["nan"], "synthetic_data.nan_at_steps = (2,)")
    run_train(out["adalrs"], "train.adalrs = @AdaLRSConfig()", "AdaLRSConfig.window = 3",
              "AdaLRSConfig.alpha = 1000.0", "AdaLRSConfig.start_fraction = 0.0", "AdaLRSConfig.end_fraction = 1.0")
    return out


def test_metrics_log_tensorboard_and_plot(runs):
    base = runs["base"]
    recs = metrics(base)
    assert [r["step"] for r in recs] == list(range(1, 7))
    for r in recs:
        for key in ("loss", "ce_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens", "targets"):
            assert math.isfinite(r[key]), (key, r)
        assert r["nonfinite_step"] == 0 and r["dropped_targets"] == 0
        assert 0 < r["targets"] < r["tokens"] <= 4 * 48
    assert recs[-1]["loss"] < recs[0]["loss"]
    tags = event_tags(base)
    assert tags["train/loss"] == 6 and tags["train/tokens_per_s"] == 6 and tags["train/mfu"] == 6
    assert "train.trainable = ('adapter', 'llm')" in (base / "config.gin").read_text()
    assert "OptimizerConfig.learning_rate = 0.003" in (base / "operative_config.gin").read_text()
    assert main(["plot", "--workdir", str(base)]) == 0
    import matplotlib.image

    img = matplotlib.image.imread(base / "loss.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_frozen_group_is_unchanged_and_has_no_optimizer_state(runs):
    first, last = (load_item(runs["base"], s, "params") for s in (1, 6))
    assert trees_equal(first["vision_model"], last["vision_model"])
    assert not trees_equal(first["mlp1"], last["mlp1"])
    assert not trees_equal(first["language_model"], last["language_model"])
    opt = load_item(runs["base"], 6, "opt_state")
    leaves = " ".join(str(p) for p, _ in __import__("jax").tree_util.tree_leaves_with_path(opt))
    assert "language_model" in leaves and "mlp1" in leaves and "vision_model" not in leaves


def test_nonfinite_step_is_skipped_and_leaves_the_state_unchanged(runs):
    recs = metrics(runs["nan"])
    assert [r["nonfinite_step"] for r in recs] == [0, 0, 1, 0, 0, 0]
    assert [r["nonfinite_steps"] for r in recs] == [0, 0, 1, 1, 1, 1]
    assert recs[2]["loss"] == "nan" and math.isfinite(recs[-1]["loss"])
    # step 3 (0-based index 2) was poisoned: the state after it equals the base run's state after step 2
    for item in ("params", "opt_state"):
        assert trees_equal(load_item(runs["nan"], 3, item), load_item(runs["base"], 2, item))
        assert not trees_equal(load_item(runs["nan"], 4, item), load_item(runs["base"], 2, item))
    assert load_item(runs["nan"], 6, "train_state")["skipped_total"] == 1


def test_consecutive_nonfinite_steps_abort(tmp_path):
    with pytest.raises(TrainingAborted, match=r"2 consecutive steps \(2\.\.3\) had a non-finite loss"):
        run_train(tmp_path, "synthetic_data.nan_at_steps = (1, 2)", "train.max_consecutive_skips = 2")


def test_adalrs_rollback_restores_params_and_optimizer_state(runs):
    events = load_item(runs["adalrs"], 6, "train_state")["adalrs"]["events"]
    assert events and events[0]["decision"] == "rollback_loss_above_max", events
    rollback_step = events[0]["step"]  # 0-based step whose loss exceeded the maximum
    assert events[0]["snapshot_step"] == 3 and events[0]["to"] == 0.5
    # The snapshot was taken after 3 baseline steps at multiplier 1 (identical to the base run); the checkpoint
    # written right after the rollback holds exactly that state.
    for item in ("params", "opt_state"):
        assert trees_equal(load_item(runs["adalrs"], rollback_step + 1, item), load_item(runs["base"], 3, item))
    recs = metrics(runs["adalrs"])
    assert [r["lr_scale"] for r in recs[:3]] == [1.0] * 3 and recs[3]["lr_scale"] == 1000.0
    assert recs[-1]["lr_scale"] == 0.5 and math.isfinite(recs[-1]["loss"])


def test_workdir_with_checkpoints_needs_resume_and_a_matching_model(runs):
    with pytest.raises(ValueError, match="already holds checkpoints .latest step 6.; pass --resume"):
        run_train(runs["base"])
    with pytest.raises(ValueError, match=re.escape("llm.hidden_size: 32 (checkpoint) vs 64 (config)")):
        run_train(runs["base"], "LLMConfig.hidden_size = 64",
                  resume=True)
    with pytest.raises(ValueError, match=re.escape("runtime.scan_layers: False (checkpoint) vs True (config)")):
        run_train(runs["base"], "RuntimeConfig.scan_layers = True", resume=True)


def test_resume_of_a_finished_run_does_nothing(runs):
    assert run_train(runs["base"], resume=True) == {}
    assert len(metrics(runs["base"])) == 6


def test_a_schedule_change_on_resume_is_refused_unless_allowed(runs, tmp_path, capsys):
    import shutil

    w = tmp_path / "changed"
    shutil.copytree(runs["base"], w)
    base = ["train", f"--gin_file={TINY_GIN}", f"--gin.WORKDIR='{w}'", "--resume"]
    assert main([*base, "--gin.train.steps=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("sail-jax train: error: train.steps changed on --resume: 6 (checkpoint 6) -> 8; the learning "
                       "rate would jump. Pass --allow-schedule-change (train.allow_schedule_change=True) to accept it")
    assert main([*base, "--gin.OptimizerConfig.learning_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "OptimizerConfig.learning_rate changed on --resume: 0.003 (checkpoint 6) -> 0.001;" in err
    assert len(metrics(w)) == 6
    assert main([*base, "--gin.train.steps=8", "--allow-schedule-change"]) == 0
    assert [r["step"] for r in metrics(w)] == list(range(1, 9))
    assert load_item(w, 8, "train_state")["schedule"]["steps"] == 8


def test_init_from_a_model_checkpoint(runs, tmp_path):
    source = runs["base"] / "checkpoints" / "6"
    run_train(tmp_path / "ok", f"train.init_from = '{source}'")
    # the first step starts from the trained parameters: lower loss on the same first batch
    assert metrics(tmp_path / "ok")[0]["loss"] < metrics(runs["base"])[0]["loss"] - 0.05
    with pytest.raises(ValueError, match=re.escape("llm.vocab_size: 512 (checkpoint) vs 256 (config)")):
        run_train(tmp_path / "bad", f"train.init_from = '{source}'",
                  "LLMConfig.vocab_size = 256", "ModelConfig.img_context_token_id = 255")
