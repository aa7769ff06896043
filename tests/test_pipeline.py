"""The whole pipeline on demo data: batch contract, bad input end to end, mixtures, per-process shards, exact
checkpoint/restore (Grain state, Orbax with a model item, worker processes)."""

from __future__ import annotations

import dataclasses
import json
import logging

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from sail_jax.config import IMG_CONTEXT_TOKEN_ID
from sail_jax.data.batch import DTYPES, KEYS
from sail_jax.data.packing import SkipBadSamplesIterDataset
from sail_jax.data.pipeline import DataConfig, DatasetSpec, build_dataset, sample_dataset
from sail_jax.evaluation.demo import make_demo_data
from tests.data_utils import skip_counts

TILE, TOKENS_PER_TILE = 56, 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, n=24, seed=0, n_heldout=2)
    return out


def config(data_dir, datasets, **kw) -> DataConfig:
    args = dict(datasets=datasets, tokenizer_dir=str(data_dir / "tokenizer"), seq_len=512, batch_size=4,
                max_tiles=8, image_size=TILE, num_devices=2, num_workers=0, num_packing_bins=4)
    return DataConfig(**{**args, **kw})


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_follow_the_contract(data_dir, demo):
    it = iter(build_dataset(config(data_dir, [DatasetSpec(str(demo / "train.jsonl"))], num_epochs=1), 0, 1))
    batches = list(it)
    samples = 0
    for b in batches:
        assert tuple(b) == KEYS and all(b[k].dtype == DTYPES[k] for k in KEYS)
        assert all(b[k].shape == (4, 512) and b[k].dtype == np.int32
                   for k in ("input_ids", "segment_ids", "positions", "loss_mask"))
        assert b["pixel_values"].shape == (4, 8, 3, TILE, TILE) and b["pixel_values"].dtype == np.float32
        assert b["tile_mask"].shape == (4, 8) and b["tile_mask"].dtype == bool
        # Each row's image tokens match its real tiles, which sit first in the row's slots.
        ctx = (b["input_ids"] == IMG_CONTEXT_TOKEN_ID).sum(axis=1)
        np.testing.assert_array_equal(ctx, b["tile_mask"].sum(axis=1) * TOKENS_PER_TILE)
        assert (np.sort(~b["tile_mask"], axis=1, kind="stable") == ~b["tile_mask"]).all()
        assert not b["loss_mask"][b["segment_ids"] == 0].any()
        assert not b["pixel_values"][~b["tile_mask"]].any()
        samples += int(b["segment_ids"].max(axis=1).sum())
    assert samples == 24
    counts = skip_counts(it.get_state())
    assert counts["seen"] == [24] and all(sum(v) == 0 for k, v in counts.items() if k != "seen")
    assert len(batches) > 1


def test_bad_input_is_skipped_counted_and_located(data_dir, tmp_path, caplog):
    Image.new("RGB", (56, 56), "red").save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    good = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                 {"from": "gpt", "value": "red"}]}
    long_turn = {"from": "human", "value": "<image>\n" + "Colour? " * 300}
    lines = [good, "{broken json", {**good, "image": "missing.png"}, {**good, "image": "corrupt.png"},
             {**good, "image": ["ok.png", "ok.png"]}, {**good, "conversations": [long_turn, good["conversations"][1]]},
             good]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    cfg = config(data_dir, [DatasetSpec(str(path))], seq_len=256, num_epochs=1, max_skip_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="sail_jax.data"):
        batches = list(build_dataset(cfg, 0, 1))
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 2  # the run went on
    for line, reason in [(2, "malformed"), (3, "missing_image"), (4, "bad_image"), (5, "image_mismatch"),
                         (6, "too_long")]:
        assert f"{path}:{line} ({reason})" in caplog.text
    # The live counters of the skip stage (the batch iterator's state holds them as of its restart point).
    it = iter(SkipBadSamplesIterDataset(sample_dataset(cfg, 0, 1), [str(path)], max_skip_fraction=1.0))
    assert len(list(it)) == 2
    assert {k: v[0] for k, v in skip_counts(it.get_state()).items()} == {
        "seen": 7, "truncated": 0, "malformed": 1, "missing_image": 1, "bad_image": 1, "image_mismatch": 1,
        "too_long": 1, "missing_video": 0, "bad_video": 0}
    # The limit compares a 99.87% lower confidence bound of the bad fraction (5 of every 7 lines here) with 0.5.
    with pytest.raises(ValueError, match=rf"dataset {path}: 34 of 47 samples were unusable"):
        list(build_dataset(config(data_dir, [DatasetSpec(str(path))], seq_len=256, num_epochs=None, shuffle=False,
                                  max_skip_fraction=0.5, min_samples_for_skip_check=5), 0, 1))


def text_dataset(tmp_path, name: str, n: int) -> DatasetSpec:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"{name} {i}?"},
                                                          {"from": "gpt", "value": "ok"}]}) + "\n"
                            for i in range(n)))
    return DatasetSpec(str(path), name=name)


def stream(cfg: DataConfig, n: int, process_index: int = 0, process_count: int = 1) -> list[str]:
    it = iter(sample_dataset(cfg, process_index, process_count))
    return [next(it)["info"]["where"] for _ in range(n)]


def test_mixture_follows_weights_and_seed(data_dir, tmp_path):
    specs = [dataclasses.replace(text_dataset(tmp_path, "a", 13), weight=3.0), text_dataset(tmp_path, "b", 7)]
    cfg = config(data_dir, specs, seed=1)
    seen = stream(cfg, 120)
    share_a = sum("a.jsonl" in w for w in seen) / len(seen)
    assert abs(share_a - 0.75) < 0.02  # resampling by weight, far from the 13:7 size ratio
    assert stream(cfg, 120) == seen  # deterministic
    assert stream(config(data_dir, specs, seed=2), 120) != seen


def test_each_process_reads_its_own_shard(data_dir, tmp_path):
    cfg = config(data_dir, [text_dataset(tmp_path, "a", 10)], num_epochs=1)
    shards = [stream(cfg, 5, p, 2) for p in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(stream(cfg, 10))


def test_orbax_checkpoint_restores_the_next_batch(data_dir, demo, tmp_path):
    ds = build_dataset(config(data_dir, [DatasetSpec(str(demo / "train.jsonl"))]), 0, 1)
    it = iter(ds)
    take(it, 2)
    model = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(model=ocp.args.StandardSave(model),
                                             data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 2)

    restored_it = iter(ds)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            model=ocp.args.StandardRestore(model), data=grain.checkpoint.CheckpointRestore(restored_it)))
    np.testing.assert_array_equal(out.model["w"], model["w"])
    assert_same(take(restored_it, 2), expected)


def test_every_intermediate_state_restores_exactly(data_dir, tmp_path):
    specs = [text_dataset(tmp_path, "a", 9), text_dataset(tmp_path, "b", 5)]
    cfg = config(data_dir, specs, seq_len=160, num_epochs=1, batch_size=2, num_devices=1)
    grain.experimental.assert_equal_output_after_checkpoint(build_dataset(cfg, 0, 1))


def test_state_is_exact_with_worker_processes(data_dir, demo):
    ds = build_dataset(config(data_dir, [DatasetSpec(str(demo / "train.jsonl"))], num_workers=2), 0, 1)
    it = iter(ds)
    take(it, 1)
    state = it.get_state()
    expected = take(it, 2)
    it.close()
    restored = iter(ds)
    restored.set_state(state)
    try:
        assert_same(take(restored, 2), expected)
    finally:
        restored.close()
