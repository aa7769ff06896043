"""gin on the command line: dash and t5x flag spellings, `--dry-run`, and every gin error as one line (exit 2)
before anything is created."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sail_jax.cli import main


def dry_run(capsys, *argv: str) -> str:
    assert main([*argv, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_train_dry_run_prints_the_operative_config_and_creates_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    out = dry_run(capsys, "train", "--gin-file=configs/synthetic_demo.gin", f"--gin.WORKDIR='{workdir}'",
                  "--gin-bindings=train.mesh = {'data': 2, 'fsdp': -1}")
    assert "model.llm: LLMConfig(vocab_size=512, " in out and "model: select_layer=-1, img_context_token_id=511" in out
    assert "runtime: RuntimeConfig(dtype='float32', " in out
    assert f"train: workdir='{workdir}', steps=200, batch_size=8, seq_len=128, " in out
    assert "optimizer: OptimizerConfig(learning_rate=0.003, " in out
    assert "data: synthetic_data(max_tiles=2, image_prob=0.5, " in out
    assert "mesh: data=2, fsdp=4, tensor=1, expert=1 (train.mesh = {'data': 2, 'fsdp': -1})" in out
    assert list(tmp_path.iterdir()) == []


def test_console_script_from_another_directory_finds_the_shipped_configs(tmp_path):
    """The real `sail-jax` process (malloc re-exec forced) started elsewhere: relative gin names still resolve to
    the package's configs/, and the re-exec does not put the checkout on sys.path (gin would then try to read
    `configs/...` as a package resource and fail)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAIL_JAX_MALLOC_TUNED")}
    env["SAIL_JAX_MALLOC_TUNING"] = "1"
    script = Path(sys.executable).parent / "sail-jax"
    out = subprocess.run([str(script), "train", "--gin-file=configs/stage/sft.gin", "--gin-file=configs/model/tiny.gin",
                          "--gin.DATA=@synthetic_data", f"--gin.WORKDIR='{tmp_path / 'run'}'", "--gin.train.steps=3",
                          "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "model.llm: LLMConfig(vocab_size=151936, hidden_size=32, " in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_includes_resolve_with_the_checkout_on_the_python_path_from_another_directory(tmp_path):
    """A checkout on PYTHONPATH makes `configs` importable as a namespace package; gin's package lookup of an
    `include 'configs/...'` then used to crash (no file origin) instead of going on to the repository root."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "SAIL_JAX_MALLOC_TUNED": "1"}
    out = subprocess.run([sys.executable, "-m", "sail_jax", "train", "--gin-file=configs/synthetic_demo.gin",
                          f"--gin.WORKDIR='{tmp_path / 'run'}'", "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "model.llm: LLMConfig(vocab_size=512, hidden_size=32, " in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_issue_case_on_the_command_line_keeps_the_model_file_runtime(tmp_path, capsys):
    out = dry_run(capsys, "train", "--gin_file=configs/stage/sft.gin", "--gin-file=configs/model/8b.gin",
                  "--gin.RuntimeConfig.attention_impl='pallas'", "--gin.DATA=@synthetic_data",
                  f"--gin.WORKDIR='{tmp_path / 'run'}'", "--gin_bindings=train.steps = 3")
    assert ("runtime: RuntimeConfig(dtype='bfloat16', param_dtype='float32', attention_impl='pallas', "
            "moe_impl='ragged_dot', moe_a2a='auto', scan_layers=True, remat_policy='full', ") in out
    assert "hidden_size=4096" in out and "steps=3, batch_size=512, seq_len=8192" in out


def test_gin_search_path_finds_files_and_compile_dry_run(tmp_path, capsys):
    (tmp_path / "mine.gin").write_text("include 'configs/model/tiny.gin'\nLLMConfig.num_layers = 1\n")
    out = dry_run(capsys, "compile", "--gin-file=configs/stage/sft.gin", f"--gin-search-path={tmp_path}",
                  "--gin-file=mine.gin", "--gin.train.steps=5")
    assert "num_layers=1, " in out and "mesh: data=1, fsdp=8, " in out
    assert "compile: topology=this host, max_tiles=" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.gin"]


BASE = ["--gin-file=configs/synthetic_demo.gin"]
ERRORS = [  # (extra argv, the file's text or None, what the one line says)
    (["--gin.RuntimeConfg.scan_layers=True"], None,
     "No configurable matching 'RuntimeConfg'. (in binding 'RuntimeConfg.scan_layers = True')"),
    (["--gin.RuntimeConfig.scan_layer=True"], None,
     "Configurable 'RuntimeConfig' doesn't have a parameter named 'scan_layer'."),
    ([], "include 'configs/model/tiny.gin'\n\nVisionConfig.image_sise = 56\n",
     "doesn't have a parameter named 'image_sise'. (in {file}, line 3: VisionConfig.image_sise = 56)"),
    (["--gin.RuntimeConfig.scan_layers='yes'"], None, "RuntimeConfig.scan_layers = 'yes': expected bool, got str"),
    (["--gin.train.steps='10'"], None, "train.steps = '10': expected int | None, got str"),
    (["--gin.CheckpointConfig.keep=2.5"], None, "CheckpointConfig.keep = 2.5: expected int, got float"),
    (["--gin.synthetic_data.max_tiles='2'"], None, "synthetic_data.max_tiles = '2': expected int, got str"),
    (["--gin.RuntimeConfig.attention_impl=pallas"], None,
     "cannot parse value 'pallas' (strings need quotes: 'pallas') "
     "(in binding 'RuntimeConfig.attention_impl = pallas')"),
    ([], "include 'configs/model/tiny.gin'\nRuntimeConfig.remat_policy = full\n",
     "cannot parse value 'full' (strings need quotes: 'full') (in {file}, line 2: RuntimeConfig.remat_policy = full)"),
    (["--gin-file=configs/model/nope.gin"], None, "gin file configs/model/nope.gin not found"),
    ([], "include 'configs/stage/nope.gin'\n", "gin file configs/stage/nope.gin not found (relative names are "
     "looked up in --gin-search-path, the repository root and the current directory) (in {file}, line 1: include"),
    (["--gin.WORKDIR=%gin.REQUIRED"], None, "required gin macro(s) not set: WORKDIR (set them in a --gin-file or"),
    (["--gin.DATA=@grain_data", "--gin.grain_data.tokenizer_dir='x'"], None,
     "grain_data.datasets is not set: add --gin.grain_data.datasets=..."),
    (["--gin-file=configs/demo.gin", "--gin.grain_data.tokenizer_dir='x'"], None,
     "grain_data.datasets is not set (it is %gin.REQUIRED): add --gin.grain_data.datasets=..."),
    (["--gin.train.steps=%gin.REQUIRED"], None,
     "train.steps is not set (it is %gin.REQUIRED): add --gin.train.steps=..."),
    (["--gin.RuntimeConfig.remat_policy='sometimes'"], None, "RuntimeConfig.remat_policy='sometimes'; expected one of"),
]


@pytest.mark.parametrize("argv,text,expected", ERRORS)
@pytest.mark.parametrize("command", ["train", "compile"])
def test_each_gin_error_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys, command, argv, text, expected):
    workdir = tmp_path / "run"
    files = []
    if text is not None:
        (tmp_path / "user.gin").write_text(text)
        files = [f"--gin-file={tmp_path / 'user.gin'}"]
    if command == "compile" and any(a.startswith(("--gin.WORKDIR", "--gin.DATA", "--gin-file=configs/demo"))
                                    for a in argv):
        pytest.skip("compile needs neither the data nor a workdir")
    assert main([command, *BASE, *files, f"--gin.WORKDIR='{workdir}'", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"sail-jax {command}: error: "), err
    assert expected.format(file=tmp_path / "user.gin") in err
    assert not workdir.exists()
