"""Conversion faults: --overwrite replaces only a destination that looks like a checkpoint, leftovers of a killed
conversion are removed by the next one, a config value of the wrong type names its key, and the refusal of a pickle
that carries code does not suggest the unsafe fix."""

from __future__ import annotations

import json
import shutil

from sail_jax.cli import main
from tests.conftest import DATA

CKPT = DATA / "sailvl2-tiny" / "checkpoint"


def _convert(src, dst, *extra: str) -> int:
    return main(["convert", "hf-to-orbax", "--src", str(src), "--dst", str(dst), "--no-progress", *extra])


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    dst = tmp_path / "notes"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    assert _convert(CKPT, dst, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "does not look like a checkpoint (no config.json or params/)" in err and len(err.splitlines()) == 1
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_leftovers_of_a_killed_conversion_are_removed(tmp_path, capsys):
    dst = tmp_path / "d"
    for leftover in (tmp_path / ".d.tmp-abc123" / "params", tmp_path / ".d.old-xyz" / "d"):
        leftover.mkdir(parents=True)
    (tmp_path / ".other.tmp-1").mkdir()  # another destination's: not ours to remove
    assert _convert(CKPT, dst) == 0
    assert "removed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "d"]


def test_a_config_value_of_the_wrong_type_names_its_key(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(CKPT, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["llm_config"]["num_hidden_layers"] = "two"
    (src / "config.json").write_text(json.dumps(cfg))
    assert _convert(src, tmp_path / "d") == 2
    err = capsys.readouterr().err
    assert "llm_config: key 'num_hidden_layers' must be a number, got 'two'" in err and len(err.splitlines()) == 1


class Payload:
    """Stands in for any object whose unpickling would run code."""


def test_the_pickle_refusal_says_what_to_do_instead(tmp_path, capsys):
    import torch

    torch.save({"w": torch.ones(2), "extra": Payload()}, tmp_path / "evil.pt")
    rc = main(["convert", "torch-to-orbax", "--src", str(tmp_path / "evil.pt"), "--config", str(CKPT / "config.json"),
               "--dst", str(tmp_path / "d"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Payload" in err and "re-save its tensors" in err
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err
