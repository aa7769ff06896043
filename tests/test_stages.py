"""The post-training stage configs: each resolves in a dry run with the paper's values (sequence, batch, peak LR,
one epoch counted from the packed rows, loss on thought + answer or conditional), and each trains 2 steps on the
tiny model with generated data. The 2-step runs bind one learning rate, loss budget and shape, so they share one
compiled step."""

from __future__ import annotations

import json
import math

import pytest

from sail_jax.cli import main
from sail_jax.evaluation.demo import make_demo_data

TOKENIZER = "--gin.grain_data.tokenizer_dir='tests/data/tokenizer'"
TINY = ["--gin-file=configs/model/tiny.gin", "--gin.VisionConfig.image_size=56", TOKENIZER]
# stage -> (sequence length, global batch, peak LR, data macros, what the data line must show)
STAGES = {
    "sft_phase1": (8192, 512, 1e-05, ["INFINITY_MM_STAGE2"], "'name': 'infinity_mm_stage2'"),
    "sft_phase2": (8192, 512, 1e-05, ["SAIL_INSTRUCTION2"], "'name': 'sail_instruction2'"),
    "sft_phase3": (8192, 512, 1e-05, ["LLAVA_COT", "MMPR", "CONDOR"], "'name': 'condor'"),
    "longcot_sft": (20480, 1024, 1e-06, ["LONGCOT"], "loss_on='thought_and_answer'"),
    "think_fusion_sft": (20480, 1024, 1e-06, ["THINK_FUSION_DIRECT", "THINK_FUSION_COT"],
                         "'name': 'cot', 'weight': 0.1}], tokenizer_dir='tests/data/tokenizer', loss_on='conditional'"),
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage_data")
    make_demo_data(out, n=24, seed=0, n_heldout=8)
    (out / "more.jsonl").write_text((out / "heldout.jsonl").read_text())  # a third source (same images)
    return out


def stage_args(stage: str, demo, workdir) -> list[str]:
    files = ["train.jsonl", "heldout.jsonl", "more.jsonl"]
    data = [f"--gin.{m}='{demo / f}'" for m, f in zip(STAGES[stage][3], files)]
    return ["train", f"--gin-file=configs/stage/{stage}.gin", *TINY, *data, f"--gin.WORKDIR='{workdir}'"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_config_resolves_with_the_paper_values(stage, demo, tmp_path, capsys):
    seq_len, batch, lr, _, data = STAGES[stage]
    assert main([*stage_args(stage, demo, tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"batch_size={batch}, seq_len={seq_len}, trainable=('vision', 'adapter', 'llm')" in out
    assert f"OptimizerConfig(learning_rate={lr}, " in out and out.count("epochs=1") == 2, out
    rows = int(out.split("train.epochs=1: ")[1].split(" packed rows")[0])
    assert f"{rows} packed rows / batch {batch} = {math.ceil(rows / batch)} steps" in out and rows > 0
    assert data in out
    assert not (tmp_path / "run").exists()


def test_a_required_data_source_left_unset_is_one_line(demo, tmp_path, capsys):
    argv = stage_args("think_fusion_sft", demo, tmp_path / "run")
    assert main([a for a in argv if not a.startswith("--gin.THINK_FUSION_COT")]) == 2
    err = capsys.readouterr().err
    assert "THINK_FUSION_COT is not set (it is %gin.REQUIRED): add --gin.THINK_FUSION_COT=..." in err


def test_each_stage_trains_two_steps_on_tiny(demo, tmp_path, capsys):
    """LongCoT keeps its `train.epochs = 1`: its data packs into 9 rows, 2 batches of 8 (the count goes through
    the real run); the others bind 2 steps."""
    same_shape = ["--gin.train.seq_len=256", "--gin.train.batch_size=8", "--gin.train.target_fraction=0.25",
                  "--gin.OptimizerConfig.learning_rate=1e-5", "--gin.grain_data.max_tiles=4",
                  "--gin.grain_data.max_num=1", "--gin.grain_data.num_workers=0"]
    for stage in STAGES:
        workdir = tmp_path / stage
        length = [] if stage == "longcot_sft" else ["--gin.train.epochs=None", "--gin.train.steps=2"]
        assert main([*stage_args(stage, demo, workdir), *same_shape, *length]) == 0, stage
        metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics), stage
        assert all(m["targets"] > 0 for m in metrics), stage
        if not length:
            assert "train.epochs=1: 9 packed rows / batch 8 = 2 steps (counted, cached in " in capsys.readouterr().err
