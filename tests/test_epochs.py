"""`train.epochs`: the packed rows of one pass, counted once and cached by a fingerprint of the data and the
packing options (a recount when either changes), the steps they give, and the gin checks around it."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from sail_jax.cli import main
from sail_jax.data.epochs import epoch_steps, packed_rows
from sail_jax.data.pipeline import DataConfig, DatasetSpec, build_dataset
from sail_jax.evaluation.demo import make_demo_data


@pytest.fixture
def data(tmp_path, data_dir) -> DataConfig:
    make_demo_data(tmp_path / "data", n=24, seed=0, n_heldout=1)
    return DataConfig(datasets=(DatasetSpec(str(tmp_path / "data" / "train.jsonl")),),
                      tokenizer_dir=str(data_dir / "tokenizer"), seq_len=256, max_tiles=4, max_num=1, image_size=56,
                      num_workers=0, num_packing_bins=4)


def test_one_epoch_is_the_rows_the_training_pipeline_makes(data):
    count = packed_rows(data)
    assert count.counted and count.cache.parent == Path(data.datasets[0].path).parent
    assert json.loads(count.cache.read_text())["rows"] == count.rows
    one_row_batches = dataclasses.replace(data, num_epochs=1, batch_size=1, num_devices=1)
    assert count.rows == sum(1 for _ in build_dataset(one_row_batches, 0, 1)) > 1
    steps, line = epoch_steps(1, count, 4)
    assert steps == math.ceil(count.rows / 4)
    assert line == (f"train.epochs=1: {count.rows} packed rows / batch 4 = {steps} steps "
                    f"(counted, cached in {count.cache})")
    steps, line = epoch_steps(3, count, 4)
    assert steps == math.ceil(3 * count.rows / 4) and line.startswith(f"train.epochs=3: 3 x {count.rows} packed rows")
    with pytest.raises(ValueError, match="train.epochs=0 must be >= 1"):
        epoch_steps(0, count, 4)


def test_the_count_is_cached_and_redone_when_data_or_packing_change(data):
    first = packed_rows(data)
    again = packed_rows(data)
    assert not again.counted and (again.rows, again.cache) == (first.rows, first.cache)
    assert "cached count from" in epoch_steps(1, again, 4)[1]
    # Other options that do not change packing (throughput, batching) share the count.
    assert not packed_rows(dataclasses.replace(data, batch_size=2, read_threads=1, prefetch_batches=0)).counted
    shorter = packed_rows(dataclasses.replace(data, seq_len=160))
    assert shorter.counted and shorter.cache != first.cache and shorter.rows > first.rows
    path = Path(data.datasets[0].path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + lines[:12]) + "\n")  # half as much data again
    grown = packed_rows(data)
    assert grown.counted and grown.cache != first.cache and grown.rows > first.rows
    assert first.cache.exists()  # earlier counts stay (a revert finds them again)


def test_without_a_writable_data_dir_the_count_is_cached_in_the_workdir(data, tmp_path):
    cache = packed_rows(data).cache
    cache.unlink()
    cache.mkdir()  # the data-side cache name can be neither read nor written now (also as root)
    workdir = tmp_path / "run"
    count = packed_rows(data, workdir)
    assert count.counted and count.cache == workdir / cache.name
    assert not packed_rows(data, workdir).counted
    assert packed_rows(data).cache is None  # no workdir: counted, not cached


GIN = ["train", "--gin-file=configs/model/tiny.gin", "--gin.WORKDIR='/nonexistent/run'", "--gin.train.batch_size=8",
       "--gin.train.seq_len=256"]


@pytest.mark.parametrize("argv, message", [
    (["--gin.DATA=@synthetic_data", "--gin.train.epochs=1"],
     "train.epochs needs a finite dataset: DATA = @grain_data (got synthetic_data); give train.steps instead"),
    (["--gin.DATA=@synthetic_data", "--gin.train.epochs=1", "--gin.train.steps=5"],
     "train.steps = 5 and train.epochs = 1: set exactly one of them"),
    (["--gin.DATA=@synthetic_data"], "train.steps = None and train.epochs = None: set exactly one of them"),
    (["--gin.DATA=@synthetic_data", "--gin.train.epochs=0"], "train.epochs = 0: must be >= 1"),
])
def test_gin_checks_of_the_run_length_are_one_line(argv, message, capsys):
    assert main([*GIN, *argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
