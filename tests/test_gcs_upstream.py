"""Upstream (config.json + safetensors) directories on `gs://`, against the local GCS emulator (tests/gcs_emulator.py):
`soup`, `convert assemble` and `train.init_from` read them through their local copy and give exactly what the same
directories give from local disk; `soup` and `assemble` write their output to the bucket. Marked `gcs`."""

from __future__ import annotations

import numpy as np
import pytest

from converters.convert import hf_to_orbax
from converters.load import load_sailvl_checkpoint
from converters.orbax_io import restore_params
from converters.soup import make_soup
from sail_jax.cli import main
from sail_jax.files import files_under, upload_tree
from tests.convert_helpers import abstract_params_for, read_safetensors_dir, synth_upstream
from tests.gcs_emulator import BUCKET
from tests.test_assemble import _aimv2, _qwen3
from tests.test_soup import CKPT, upstream_copy
from tests.test_trainer import run_train
from tests.trainer_utils import TINY_GIN, load_item, metrics, trees_equal

pytestmark = pytest.mark.gcs


def same_tree(local, url: str) -> None:
    """The files under `url` are those under the local directory `local`, byte for byte."""
    remote = {str(f)[len(url) + 1:]: f for f in files_under(url)}
    here = {str(f.relative_to(local)): f for f in local.rglob("*") if f.is_file()}
    assert sorted(remote) == sorted(here)
    for name, f in here.items():
        assert remote[name].read_bytes() == f.read_bytes(), name


def test_soup_of_upstream_directories_on_gcs(gcs, tmp_path):
    rng = np.random.default_rng(0)
    noisy = {k: (v.astype(np.float32) + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
             for k, v in read_safetensors_dir(CKPT)[0].items()}
    other = upstream_copy(tmp_path / "b", noisy)
    upload_tree(CKPT, f"gs://{BUCKET}/soup/a")
    upload_tree(other, f"gs://{BUCKET}/soup/b")

    make_soup([CKPT, other], tmp_path / "local", [0.3, 0.7], progress=False)
    assert main(["soup", "--checkpoint", f"gs://{BUCKET}/soup/a", "--checkpoint", f"gs://{BUCKET}/soup/b",
                 "--weights", "0.3,0.7", "--out", f"gs://{BUCKET}/soup/out", "--no-progress"]) == 0
    same_tree(tmp_path / "local", f"gs://{BUCKET}/soup/out")
    assert main(["generate", "--checkpoint", f"gs://{BUCKET}/soup/out", "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    with pytest.raises(ValueError, match="is one of the input checkpoints"):
        make_soup([f"gs://{BUCKET}/soup/a", f"gs://{BUCKET}/soup/out"], f"gs://{BUCKET}/soup/out/", overwrite=True)
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        make_soup([f"gs://{BUCKET}/soup/a", f"gs://{BUCKET}/soup/b"], f"gs://{BUCKET}/soup/out", progress=False)

    # our checkpoints on gs:// are read in place, and the soup of them is uploaded
    for name, d in (("a", CKPT), ("b", other)):
        hf_to_orbax(d, tmp_path / f"ours-{name}", progress=False)
        upload_tree(tmp_path / f"ours-{name}", f"gs://{BUCKET}/ours/{name}")
    make_soup([tmp_path / "ours-a", tmp_path / "ours-b"], tmp_path / "ours-local", [0.3, 0.7], progress=False)
    make_soup([f"gs://{BUCKET}/ours/a", f"gs://{BUCKET}/ours/b"], f"gs://{BUCKET}/ours/out", [0.3, 0.7],
              progress=False)
    assert trees_equal(restore_params(f"gs://{BUCKET}/ours/out"), restore_params(tmp_path / "ours-local"))


def test_assemble_from_directories_on_gcs(gcs, tmp_path, capsys):
    for name in ("qwen3", "aimv2"):
        (tmp_path / name).mkdir()
    _qwen3(tmp_path / "qwen3", moe=False, vocab=1000, strip=True)
    _aimv2(tmp_path / "aimv2", native=False)
    for name in ("qwen3", "aimv2"):
        upload_tree(tmp_path / name, f"gs://{BUCKET}/parts/{name}")

    assert main(["convert", "assemble", "--llm", str(tmp_path / "qwen3"), "--vision", str(tmp_path / "aimv2"),
                 "--dst", str(tmp_path / "local"), "--adapter-seed", "3"]) == 0
    assert main(["convert", "assemble", "--llm", f"gs://{BUCKET}/parts/qwen3", "--vision",
                 f"gs://{BUCKET}/parts/aimv2", "--dst", f"gs://{BUCKET}/assembled", "--adapter-seed", "3"]) == 0
    same_tree(tmp_path / "local", f"gs://{BUCKET}/assembled")
    assert main(["convert", "assemble", "--llm", f"gs://{BUCKET}/parts/nope", "--vision", str(tmp_path / "aimv2"),
                 "--dst", str(tmp_path / "x")]) == 2
    assert f"gs://{BUCKET}/parts/nope/config.json: no such file" in capsys.readouterr().err


def test_train_init_from_an_upstream_directory_on_gcs(gcs, tmp_path):
    from sail_jax.training import gin_setup

    gin_setup.parse([TINY_GIN], [f"WORKDIR = '{tmp_path}'"])
    cfg = gin_setup.train_arguments(["model"])["model"]
    synth_upstream(tmp_path / "up", cfg, abstract_params_for(cfg, scanned=False), seed=5, dtype="float32")
    upload_tree(tmp_path / "up", f"gs://{BUCKET}/up")

    run_train(tmp_path / "local", f"train.init_from = '{tmp_path / 'up'}'", "train.steps = 1")
    run_train(tmp_path / "gcs", f"train.init_from = 'gs://{BUCKET}/up'", "train.steps = 1")
    assert metrics(tmp_path / "gcs")[0]["loss"] == metrics(tmp_path / "local")[0]["loss"]
    assert trees_equal(load_item(tmp_path / "gcs", 1, "params"), load_item(tmp_path / "local", 1, "params"))
    # it started from the upstream weights: the frozen vision tower is still exactly them
    upstream = load_sailvl_checkpoint(tmp_path / "up", cfg.runtime)[1]["params"]
    assert trees_equal(load_item(tmp_path / "gcs", 1, "params")["vision_model"], upstream["vision_model"])
    # the upstream config must match the configured model, as our checkpoints must
    with pytest.raises(ValueError, match="llm.num_layers: 1 \\(checkpoint\\) vs 2 \\(config\\)"):
        run_train(tmp_path / "bad", f"train.init_from = 'gs://{BUCKET}/up'", "train.steps = 1",
                  "LLMConfig.num_layers = 2")
