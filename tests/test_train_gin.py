"""gin configuration of `sail-jax train`: stacked files, flag rewriting, clear errors, stage and model configs."""

from __future__ import annotations

import dataclasses

import gin
import pytest

from sail_jax.cli import main
from sail_jax.config import ConfigError, get_preset
from sail_jax.training import gin_setup
from sail_jax.training.adalrs import AdaLRSConfig
from sail_jax.training.synthetic import synthetic_data
from tests.trainer_utils import REPO

CONFIGS = REPO / "configs"
MACROS = ["DATA = @synthetic_data", "WORKDIR = '/tmp/unused'"]


def bound(name: str):
    return gin.query_parameter(name)


def test_missing_required_macro_is_named(capsys):
    with pytest.raises(ValueError, match=r"required gin macro\(s\) not set: DATA, WORKDIR .*--gin.DATA="):
        gin_setup.parse([str(CONFIGS / "model" / "tiny.gin")], [])
    assert main(["train", "--gin_file=configs/model/tiny.gin", "--gin.DATA=@synthetic_data"]) == 2
    assert "required gin macro(s) not set: WORKDIR" in capsys.readouterr().err


def test_unknown_binding_names_the_parameter_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'configs/model/tiny.gin'\ntrain.batch_sise = 4\n")
    with pytest.raises(ValueError, match=r"(?s)'train' doesn't have a parameter named 'batch_sise'.*bad.gin.*line 2"):
        gin_setup.parse([str(bad)], MACROS)
    assert main(["train", "--gin_file=configs/synthetic_demo.gin", "--gin.OptimizerConfig.learnig_rate=1.0"]) == 2
    assert "'OptimizerConfig' doesn't have a parameter named 'learnig_rate'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # anything but --gin.NAME=VALUE stays an argparse error
        main(["train", "--gin_file=configs/synthetic_demo.gin", "--stepz=3"])


def test_gin_flags_are_rewritten_and_later_sources_win():
    assert gin_setup.rewrite_gin_args(["--gin.train.steps=3", "--gin.WORKDIR='/x'"]) == [
        "train.steps = 3", "WORKDIR = '/x'"]
    with pytest.raises(ValueError, match="expected --gin.NAME=VALUE"):
        gin_setup.rewrite_gin_args(["--gin.train.steps"])
    gin_setup.parse(["configs/stage/sft.gin", "configs/model/tiny.gin", "configs/synthetic_demo.gin"],
                    ["train.steps = 7", *gin_setup.rewrite_gin_args(["--gin.train.seq_len=64"])])
    assert bound("train.steps") == 7 and bound("train.seq_len") == 64  # bindings beat files
    assert bound("train.batch_size") == 8  # synthetic_demo.gin (later) beats sft.gin


# (stage, trainable, learning rate, batch, seq len, AdaLRS) from reference doc §9.1-9.3 (or marked our choice)
STAGES = [
    ("vit_warmup", ("adapter",), 2e-4, 1920, 8192, False),
    ("vit_alignment", ("vision", "adapter"), 2e-5, 512, 8192, False),
    ("vit_world_knowledge", ("vision", "adapter", "llm"), 1e-5, 512, 8192, False),
    ("pretrain_basic", ("adapter",), 2e-4, 2048, 8192, True),
    ("pretrain_multitask", ("vision", "adapter", "llm"), 2e-5, 2048, 8192, False),
    ("sft", ("vision", "adapter", "llm"), 1e-5, 512, 8192, False),
]


@pytest.mark.parametrize("stage,trainable,lr,batch,seq,adalrs", STAGES)
def test_stage_configs(stage, trainable, lr, batch, seq, adalrs):
    files = [f"configs/stage/{stage}.gin", "configs/model/2b.gin"]
    gin_setup.parse(files, [*MACROS, "train.steps = 10"])
    assert bound("train.trainable") == trainable and bound("train.batch_size") == batch
    assert bound("train.seq_len") == seq and bound("OptimizerConfig.learning_rate") == lr
    assert ("adalrs" in gin.get_bindings("train")) == adalrs
    if adalrs:
        cfg = AdaLRSConfig(**gin.get_bindings("AdaLRSConfig"))
        assert (cfg.alpha, cfg.beta, cfg.decay, cfg.window, cfg.start_fraction, cfg.end_fraction) == (
            3.0, 2.0, 0.99, 100, 0.1, 0.4)


@pytest.mark.parametrize("stage", ["vit_alignment", "sft"])
def test_stages_without_a_published_length_require_steps(stage):
    with pytest.raises(ValueError, match=r"train.steps set to `%gin.REQUIRED`"):
        gin_setup.parse([f"configs/stage/{stage}.gin", "configs/model/tiny.gin"], MACROS)


@pytest.mark.parametrize("name,preset", [("tiny", "tiny"), ("tiny-moe", "tiny-moe"), ("2b", "sailvl2-2b"),
                                         ("8b", "sailvl2-8b"), ("a3b", "sailvl2-a3b")])
def test_model_configs_select_presets(name, preset):
    gin_setup.parse([f"configs/model/{name}.gin"], MACROS)
    cfg = gin_setup.model_config(**gin.get_bindings("model_config"))
    ref = get_preset(preset)
    assert dataclasses.replace(cfg, runtime=ref.runtime) == ref
    if name not in ("tiny", "tiny-moe"):
        assert cfg.runtime.dtype == "bfloat16" and cfg.runtime.param_dtype == "float32" and cfg.runtime.scan_layers
    assert (cfg.llm.moe is not None) == name.endswith(("moe", "a3b"))


def test_demo_config_is_complete_and_consistent():
    gin_setup.parse(["configs/synthetic_demo.gin"], [])
    cfg = gin_setup.model_config(**gin.get_bindings("model_config"))
    it = synthetic_data(cfg=cfg, global_batch_size=bound("train.batch_size"), seq_len=bound("train.seq_len"),
                        process_index=0, process_count=1, seed=0, **gin.get_bindings("synthetic_data"))
    batch = next(it)
    assert batch["input_ids"].max() < cfg.llm.vocab_size
    assert (batch["input_ids"] == cfg.img_context_token_id).sum() == batch["tile_mask"].sum() * cfg.tokens_per_tile


def test_model_config_overrides_are_checked():
    with pytest.raises(ConfigError, match=r"model_config.llm: unknown keys \['hidden'\]"):
        gin_setup.model_config("tiny", llm={"hidden": 3})
    with pytest.raises(ConfigError, match="preset 'tiny' has no MoE layers"):
        gin_setup.model_config("tiny", moe={"num_experts": 4})
    cfg = gin_setup.model_config("tiny-moe", moe={"num_experts": 4}, runtime={"remat_policy": "full"})
    assert cfg.llm.moe.num_experts == 4 and cfg.runtime.remat_policy == "full"
