"""Video records in training: LLaVA-Video records become frame tiles (markers, sampling, frame cache), bad videos are
skipped and counted, and a tiny model takes a training step on a mixed video + image batch from the pipeline."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import numpy as np
import pytest
from PIL import Image

from sail_jax.config import get_preset
from sail_jax.data.batch import check_batch, to_global
from sail_jax.data.packing import SkipBadSamplesIterDataset
from sail_jax.data.pipeline import DataConfig, DatasetSpec, grain_data, sample_dataset
from sail_jax.data.sources import RawRecord
from sail_jax.data.transforms import SampleTransform
from sail_jax.data.video import index_video, read_frames, uniform_frame_indices, video_pixel_values
from sail_jax.sharding import use_mesh
from sail_jax.training.optim import OptimizerConfig
from sail_jax.training.program import build_program
from sail_jax.training.step import TrainState
from tests.data_utils import skip_counts
from tests.video_utils import read_index, write_bad_videos, write_video

TILE = 56  # 4 LLM tokens per tile


def record(video: str | None, question: str, answer: str = "bars", image: str | None = None) -> dict:
    obj = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if video is not None:
        obj["video"] = video
    if image is not None:
        obj["image"] = image
    return obj


def raw(obj: dict, where: str = "v.jsonl:1") -> RawRecord:
    return RawRecord(json.dumps(obj).encode(), where)


@pytest.fixture
def transform(data_dir, tmp_path):
    write_video(tmp_path / "clip.mp4", 50)
    return SampleTransform(tokenizer_dir=str(data_dir / "tokenizer"), image_root=str(tmp_path), dataset=0,
                           seq_len=512, max_tiles=8, image_size=TILE, num_frames=3)


def test_video_records_become_one_tile_per_frame(transform, tmp_path):
    outs = [transform.map(raw(record("clip.mp4", q))) for q in ("<video>\nWhat moves?", "<image>\nWhat moves?",
                                                                 "What moves?")]
    for out in outs:  # <video>, LLaVA-Video's lone <image>, and no marker read alike
        assert "skip" not in out, out
        np.testing.assert_array_equal(out["input_ids"], outs[0]["input_ids"])
    out = outs[0]
    expected = uniform_frame_indices(50, 3)
    frames = read_frames(index_video(tmp_path / "clip.mp4"), expected)
    assert [read_index(f) for f in frames] == expected.tolist()
    np.testing.assert_array_equal(out["pixel_values"], video_pixel_values(frames, TILE))
    assert out["info"]["tiles"] == 3
    tok = transform.processor.tokenizer
    text = tok.decode(out["input_ids"].tolist(), skip_special_tokens=False)
    frame = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
    assert f"user\nFrame-1: {frame}\nFrame-2: {frame}\nFrame-3: {frame}\nWhat moves?<|im_end|>" in text
    targets = tok.decode(out["input_ids"][out["loss_mask"] == 1].tolist(), skip_special_tokens=False)
    assert targets == "bars<|im_end|>"

    fps = dataclasses.replace(transform, fps=2.0).map(raw(record("clip.mp4", "<video>\nQ")))
    assert fps["info"]["tiles"] == 3  # 50 frames at 30 fps, 2 frames/s: indices 0, 15, 30
    np.testing.assert_array_equal(fps["pixel_values"], video_pixel_values(
        read_frames(index_video(tmp_path / "clip.mp4"), [0, 15, 30]), TILE))


def test_frame_cache_keeps_decoded_frames_between_epochs(transform, tmp_path):
    cache = tmp_path / "frames"
    cached = dataclasses.replace(transform, frame_cache_dir=str(cache))
    plain = transform.map(raw(record("clip.mp4", "<video>\nQ")))
    first = cached.map(raw(record("clip.mp4", "<video>\nQ")))
    [entry] = list(cache.iterdir())
    written = entry.stat().st_mtime_ns
    again = cached.map(raw(record("clip.mp4", "<video>\nQ")))
    assert entry.stat().st_mtime_ns == written and len(list(cache.iterdir())) == 1  # read, not decoded again
    for out in (first, again):
        np.testing.assert_array_equal(out["pixel_values"], plain["pixel_values"])
        np.testing.assert_array_equal(out["input_ids"], plain["input_ids"])
    with np.load(entry) as z:
        assert z["frames"].shape == (3, TILE, TILE, 3) and z["frames"].dtype == np.uint8
        assert z["indices"].tolist() == uniform_frame_indices(50, 3).tolist()
    # another sampling setting, and a changed file, are other entries; an unreadable entry is decoded again
    dataclasses.replace(cached, num_frames=2).map(raw(record("clip.mp4", "Q")))
    assert len(list(cache.iterdir())) == 2
    entry.write_bytes(b"garbage")
    np.testing.assert_array_equal(cached.map(raw(record("clip.mp4", "Q")))["pixel_values"], plain["pixel_values"])
    with np.load(entry) as z:
        assert z["frames"].shape == (3, TILE, TILE, 3)
    st = os.stat(tmp_path / "clip.mp4")
    os.utime(tmp_path / "clip.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cached.map(raw(record("clip.mp4", "Q")))
    assert len(list(cache.iterdir())) == 3 and not list(cache.glob(".*"))  # no temporary file left


def test_bad_video_records_are_skipped_and_counted(data_dir, tmp_path, caplog):
    write_video(tmp_path / "clip.mp4", 30)
    Image.new("RGB", (TILE, TILE), "red").save(tmp_path / "red.png")
    bad = write_bad_videos(tmp_path)
    lines = [record("clip.mp4", "<video>\nQ")]
    lines += [record(p.name, "<video>\nQ") for p in bad.values()]
    lines += [record("clip.mp4", "<video>\nQ", image="red.png"), record("clip.mp4", "<video> and <video>\nQ"),
              record("clip.mp4", "<video>\n<image>\nQ"), record(None, "<image>\nColour?", image="red.png")]
    path = tmp_path / "videos.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = DataConfig(datasets=(DatasetSpec(str(path), num_frames=2),), tokenizer_dir=str(data_dir / "tokenizer"),
                     seq_len=512, batch_size=2, max_tiles=8, image_size=TILE, num_workers=0, shuffle=False,
                     num_epochs=1)
    it = iter(SkipBadSamplesIterDataset(sample_dataset(cfg, 0, 1), [str(path)], max_skip_fraction=1.0))
    with caplog.at_level(logging.WARNING, logger="sail_jax.data"):
        kept = list(it)
    assert [k["info"]["tiles"] for k in kept] == [2, 1]
    counts = {k: v[0] for k, v in skip_counts(it.get_state()).items() if v[0]}
    assert counts == {"seen": 10, "missing_video": 1, "bad_video": 4, "malformed": 1, "image_mismatch": 2}
    for line, kind in enumerate(bad, start=2):
        reason = "missing_video" if kind == "missing" else "bad_video"
        assert f"{path}:{line} ({reason}): " in caplog.text and bad[kind].name in caplog.text
    assert f"{path}:7 (malformed): a record has 'image' or 'video', not both" in caplog.text


def test_train_step_on_a_mixed_video_and_image_batch(data_dir, tmp_path):
    for k in range(2):
        write_video(tmp_path / f"clip{k}.mp4", 20 + 10 * k)
    Image.new("RGB", (TILE, TILE), "red").save(tmp_path / "red.png")
    videos, images = tmp_path / "video.jsonl", tmp_path / "image.jsonl"
    videos.write_text("".join(json.dumps(record(f"clip{k % 2}.mp4", "<video>\nWhat moves?")) + "\n"
                              for k in range(4)))
    images.write_text("".join(json.dumps(record(None, "<image>\nColour?", "red", image="red.png")) + "\n"
                              for _ in range(4)))
    tiny = get_preset("tiny")
    cfg = tiny.replace(vision=dataclasses.replace(tiny.vision, image_size=TILE, num_layers=1),
                       llm=dataclasses.replace(tiny.llm, num_layers=1))
    it = grain_data(cfg=cfg, global_batch_size=4, seq_len=256, process_index=0, process_count=1, seed=0,
                    datasets=[{"path": str(videos), "num_frames": 3}, {"path": str(images)}],
                    tokenizer_dir=str(data_dir / "tokenizer"), max_tiles=8, num_workers=0, num_packing_bins=2,
                    frame_cache_dir=str(tmp_path / "cache"))
    batch = next(it)
    check_batch(batch, 4, 256, cfg)
    from sail_jax.data.processor import SailProcessor

    text = SailProcessor.from_dir(data_dir / "tokenizer").tokenizer.decode(
        batch["input_ids"][batch["segment_ids"] > 0].tolist(), skip_special_tokens=False)
    assert text.count("Frame-1: ") >= 1 and text.count("Colour?") >= 1  # both kinds in the batch
    assert text.count("<img>") == batch["tile_mask"].sum()

    program = build_program(model=cfg, batch_size=4, seq_len=256, steps=1, trainable=("adapter", "llm"),
                            optimizer=OptimizerConfig(learning_rate=1e-3), mesh={"data": 2, "fsdp": 2})
    with use_mesh(program.mesh):
        params = program.init_params(jax.random.PRNGKey(0))
        state = TrainState(params, program.init_opt_state(params))
        _, metrics = program.step(state, to_global(batch, program.mesh, 4), np.int32(0), np.float32(1.0))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["targets"]) > 0
    assert float(metrics["skipped"]) == 0


def test_sft_phase4_mixes_video_and_images_and_needs_a_video_dataset(tmp_path, capsys):
    from sail_jax.cli import main

    argv = ["train", "--gin-file=configs/model/tiny.gin", "--gin-file=configs/stage/sft_phase4.gin",
            f"--gin.WORKDIR='{tmp_path / 'run'}'", "--gin.train.steps=1", "--gin.grain_data.tokenizer_dir='tok'",
            "--gin.IMAGE_DATA='images.jsonl'", "--dry-run"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "sail-jax train: error: VIDEO_DATA is not set (it is %gin.REQUIRED): add --gin.VIDEO_DATA=...\n"
    assert main([*argv, "--gin.VIDEO_DATA='video.jsonl'"]) == 0
    out = capsys.readouterr().out
    assert "seq_len=16384" in out and ("data: grain_data(data_shards=None, datasets=[{'path': 'video.jsonl', "
                                       "'num_frames': 16, 'weight': 1.0}, {'path': 'images.jsonl', 'weight': 1.0}]"
                                       ) in out
    assert not (tmp_path / "run").exists()


def test_skip_counts_of_a_checkpoint_without_the_video_reasons_restore():
    import grain

    source = grain.MapDataset.source([{"skip": "bad_video", "dataset": 0, "where": "v:1", "error": "x"}] * 3)
    it = iter(SkipBadSamplesIterDataset(source.to_iter_dataset(), ["v.jsonl"], max_skip_fraction=1.0))
    state = it.get_state()
    old = {**state, "skip_counts": {k: v for k, v in state["skip_counts"].items()
                                    if k not in ("missing_video", "bad_video")}}
    it.set_state(old)
    assert list(it) == [] and skip_counts(it.get_state())["bad_video"] == [3]
