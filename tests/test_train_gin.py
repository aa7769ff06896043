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


# (stage, trainable, learning rate, batch, seq len, AdaLRS): the paper's training stages (or our choice, marked in
# the stage file)
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
    with pytest.raises(ValueError, match=r"train.steps is not set \(it is %gin.REQUIRED\): add --gin.train.steps="):
        gin_setup.parse([f"configs/stage/{stage}.gin", "configs/model/tiny.gin"], MACROS)


@pytest.mark.parametrize("name,preset", [("tiny", "tiny"), ("tiny-moe", "tiny-moe"), ("2b", "sailvl2-2b"),
                                         ("8b", "sailvl2-8b"), ("a3b", "sailvl2-a3b"),
                                         ("anyres-2b", "sailvl2-anyres-2b"), ("tiny-anyres", "tiny-anyres")])
def test_model_configs_select_presets(name, preset):
    gin_setup.parse([f"configs/model/{name}.gin"], MACROS)
    cfg = gin_setup.model_config(**gin.get_bindings("model_config"))
    ref = get_preset(preset)
    assert dataclasses.replace(cfg, runtime=ref.runtime) == ref
    if not name.startswith("tiny"):
        assert cfg.runtime.dtype == "bfloat16" and cfg.runtime.param_dtype == "float32" and cfg.runtime.scan_layers
    assert (cfg.llm.moe is not None) == name.endswith(("moe", "a3b"))
    assert cfg.vision.anyres == ("anyres" in name)


def test_demo_config_is_complete_and_consistent():
    gin_setup.parse(["configs/synthetic_demo.gin"], [])
    cfg = gin_setup.model_config(**gin.get_bindings("model_config"))
    it = synthetic_data(cfg=cfg, global_batch_size=bound("train.batch_size"), seq_len=bound("train.seq_len"),
                        process_index=0, process_count=1, seed=0, **gin.get_bindings("synthetic_data"))
    batch = next(it)
    assert batch["input_ids"].max() < cfg.llm.vocab_size
    assert (batch["input_ids"] == cfg.img_context_token_id).sum() == batch["tile_mask"].sum() * cfg.tokens_per_tile


def test_a_later_binding_overrides_one_field_and_keeps_the_preset_file_values():
    """The issue's case: 8b.gin sets bf16, scan and full remat; a flag naming one RuntimeConfig field keeps them."""
    flags = gin_setup.rewrite_gin_args(["--gin.RuntimeConfig.attention_impl='pallas'"])
    gin_setup.parse(["configs/model/8b.gin"], [*MACROS, *flags])
    rt = gin_setup.model_config("sailvl2-8b").runtime
    assert (rt.attention_impl, rt.dtype, rt.param_dtype, rt.scan_layers, rt.remat_policy) == (
        "pallas", "bfloat16", "float32", True, "full")


def test_model_parts_are_bound_field_by_field_over_the_preset():
    gin_setup.parse(["configs/model/tiny-moe.gin"], [*MACROS, "LLMConfig.num_layers = 3", "MoEConfig.num_experts = 4",
                                                     "VisionConfig.image_size = 56", "ModelConfig.select_layer = -2",
                                                     "MoEConfig.mlp_only_layers = [0]"])
    cfg = gin_setup.model_config("tiny-moe")
    ref = get_preset("tiny-moe")
    assert cfg.llm.num_layers == 3 and cfg.llm.hidden_size == ref.llm.hidden_size  # the preset's other fields stay
    assert cfg.llm.moe.num_experts == 4 and cfg.llm.moe.num_experts_per_tok == ref.llm.moe.num_experts_per_tok
    assert cfg.llm.moe.mlp_only_layers == (0,) and cfg.vision.image_size == 56 and cfg.select_layer == -2
    assert cfg.vision.hidden_size == ref.vision.hidden_size and cfg.adapter == ref.adapter


def test_model_part_bindings_are_checked():
    gin_setup.parse(["configs/model/tiny.gin"], [*MACROS, "MoEConfig.num_experts = 4"])
    with pytest.raises(ConfigError, match="MoEConfig.num_experts is bound but preset 'tiny' has no MoE layers"):
        gin_setup.model_config("tiny")
    gin_setup.parse(["configs/model/tiny.gin"], [*MACROS, "LLMConfig.num_layers = 2.5"])
    with pytest.raises(ValueError, match="LLMConfig.num_layers = 2.5: expected int, got float"):
        gin_setup.model_config("tiny")
    with pytest.raises(ValueError, match="Configurable 'ModelConfig' has denylisted kwarg 'runtime'"):
        gin_setup.parse(["configs/model/tiny.gin"], [*MACROS, "ModelConfig.runtime = None"])
