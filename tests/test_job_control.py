"""`--checkpoint WORKDIR` (the newest complete step), relative paths, and the tokenizer a trained checkpoint carries:
every command that takes a checkpoint runs from a training workdir alone."""

from __future__ import annotations

import pytest

from converters.orbax_io import resolve_checkpoint
from sail_jax.cli import main
from sail_jax.files import as_path, is_url
from sail_jax.training import gin_setup
from tests.trainer_utils import REPO, TINY_GIN


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 2-step tiny training run that copies the repository's tokenizer into its checkpoints."""
    w = tmp_path_factory.mktemp("jobs") / "run"
    gin_setup.parse([TINY_GIN], [f"WORKDIR = '{w}'", "train.steps = 2",
                                 f"train.tokenizer_dir = '{REPO / 'assets' / 'tokenizer'}'"])
    gin_setup.train_using_gin()
    return w


def test_a_workdir_stands_for_its_newest_complete_step(workdir, monkeypatch):
    steps = workdir / "checkpoints"
    (steps / "3.orbax-checkpoint-tmp-1765000000").mkdir()  # a save killed mid-write: not a complete step
    try:
        assert resolve_checkpoint(workdir) == str(steps / "2")
        assert resolve_checkpoint(steps) == str(steps / "2")
        assert resolve_checkpoint(steps / "1") == str(steps / "1")  # a step (a checkpoint) stands for itself
        monkeypatch.chdir(workdir.parent)
        assert resolve_checkpoint("run") == str(steps / "2")  # relative: made absolute
        assert resolve_checkpoint("missing") == str(workdir.parent / "missing")  # the caller says it is missing
    finally:
        (steps / "3.orbax-checkpoint-tmp-1765000000").rmdir()


def test_a_workdir_without_a_complete_step_is_refused(tmp_path, capsys):
    (tmp_path / "w" / "checkpoints" / "4.orbax-checkpoint-tmp-1765000000").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="training workdir without a complete checkpoint"):
        resolve_checkpoint(tmp_path / "w")
    with pytest.raises(SystemExit) as e:
        main(["info", "--checkpoint", str(tmp_path / "w")])
    assert e.value.code == 2
    assert "argument --checkpoint: " in capsys.readouterr().err


def test_commands_run_from_a_relative_workdir_without_tokenizer_option(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir.parent)
    step = workdir / "checkpoints" / "2"
    assert main(["info", "--checkpoint", "run"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {step}: sail-jax (Orbax)" in out and f"tokenizer: {step / 'tokenizer'}" in out
    assert main(["generate", "--checkpoint", "run", "--prompt", "Hello", "--max-new-tokens", "2"]) == 0
    assert "2 tokens (length)" in capsys.readouterr().err
    # a relative step directory of our own, read by Orbax / TensorStore (this failed inside Orbax before)
    assert main(["convert", "orbax-to-hf", "--src", "run/checkpoints/1", "--dst", "hf", "--no-progress"]) == 0
    assert (workdir.parent / "hf" / "vocab.json").read_bytes() == (REPO / "assets/tokenizer/vocab.json").read_bytes()


def test_paths_and_urls():
    assert is_url("gs://bucket/run") and not is_url("run/checkpoints")
    assert str(as_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert as_path("a/b").is_absolute()
