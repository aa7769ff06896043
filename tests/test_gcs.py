"""A run whose WORKDIR is a `gs://` URL, for real, against a local GCS emulator (tests/gcs_emulator.py): train,
SIGKILL after a checkpoint, resume to the end, convert the workdir's checkpoint to an upstream directory on
`gs://`, read the metrics back, run `info` / `generate` from the bucket; read training data (JSONL records, their
images) and a tokenizer from the bucket, and train on them. Marked `gcs` (deselect with `-m "not gcs"`)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from sail_jax.cli import main
from sail_jax.config import IMG_CONTEXT_TOKEN_ID
from sail_jax.data.epochs import fingerprint
from sail_jax.data.images import load_image
from sail_jax.data.pipeline import DataConfig, DatasetSpec
from sail_jax.data.sources import open_source, parse_record
from sail_jax.data.tokenizer import find_tokenizer_dir
from sail_jax.evaluation.demo import make_demo_data
from sail_jax.files import as_path, local_copy, upload_tree
from tests.gcs_emulator import BUCKET
from tests.trainer_utils import REPO, TINY_GIN

pytestmark = pytest.mark.gcs
DRIVER = str(REPO / "tests" / "train_driver.py")


@pytest.fixture(scope="module")
def gcs_data(gcs, tmp_path_factory):
    """A small demo dataset (JSONL + images) at gs://BUCKET/data and the bundled tokenizer at gs://BUCKET/tok."""
    local = tmp_path_factory.mktemp("demo")
    make_demo_data(local, n=8, seed=0, n_heldout=1)
    upload_tree(local, f"gs://{BUCKET}/data")
    upload_tree(REPO / "assets" / "tokenizer", f"gs://{BUCKET}/tok")
    return f"gs://{BUCKET}/data", f"gs://{BUCKET}/tok"


def test_data_records_images_and_tokenizer_from_gcs(gcs_data, tmp_path):
    data, tok = gcs_data
    source = open_source(f"{data}/train.jsonl")
    assert len(source) == 8 and source[0].where == f"{data}/train.jsonl:1"  # messages name the URL
    array = tmp_path / "train.arrayrecord"
    assert main(["jsonl-to-arrayrecord", "--src", f"{data}/train.jsonl", "--dst", str(array)]) == 0
    (as_path(data) / array.name).write_bytes(array.read_bytes())
    records = open_source(f"{data}/{array.name}")
    assert records[7].data == source[7].data.rstrip(b"\n") and records[0].where == f"{data}/{array.name}:record 1"
    conv = next(c for c in (parse_record(source[i].data, data) for i in range(8)) if c.images)
    assert str(conv.images[0]).startswith(f"{data}/") and load_image(conv.images[0]).width > 0
    with pytest.raises(FileNotFoundError, match=f"image file not found: {data}/nope.png"):
        load_image(f"{data}/nope.png")

    local_tok = find_tokenizer_dir(tok)  # copied once: the same local copy until an object changes
    assert (local_tok / "vocab.json").read_bytes() == (REPO / "assets/tokenizer/vocab.json").read_bytes()
    assert find_tokenizer_dir(tok) == local_tok

    cfg = DataConfig(datasets=(DatasetSpec(f"{data}/train.jsonl"),), tokenizer_dir=tok, seq_len=256)
    before, copy = fingerprint(cfg), local_copy(f"{data}/train.jsonl")
    assert before["datasets"][0]["path"] == f"{data}/train.jsonl" and before["options"]["tokenizer_dir"] == tok
    (as_path(data) / "train.jsonl").write_bytes(copy.read_bytes())  # same bytes, a new object generation
    assert fingerprint(cfg) != before and local_copy(f"{data}/train.jsonl") != copy


def test_rl_prompts_from_gcs(gcs):
    from sail_jax.rl import read_prompts

    record = {"id": "a", "image": "img/1.png", "question": "How many circles?", "answer": 3, "kind": "count"}
    (as_path(f"gs://{BUCKET}/rl") / "rl.jsonl").write_text(json.dumps(record) + "\n{bad\n")
    result = read_prompts(f"gs://{BUCKET}/rl/rl.jsonl")
    assert [str(p) for p in result.prompts[0].images] == [f"gs://{BUCKET}/rl/img/1.png"]
    assert result.bad_lines[0].startswith(f"gs://{BUCKET}/rl/rl.jsonl:2: ")


def test_video_records_under_a_gcs_root(gcs, tmp_path):
    from sail_jax.data.sources import RawRecord
    from sail_jax.data.transforms import SampleTransform
    from tests.video_utils import write_video

    write_video(tmp_path / "clip.mp4", 20)
    (as_path(f"gs://{BUCKET}/videos") / "clip.mp4").write_bytes((tmp_path / "clip.mp4").read_bytes())
    transform = SampleTransform(tokenizer_dir=str(REPO / "assets" / "tokenizer"), image_root=f"gs://{BUCKET}/videos",
                                dataset=0, seq_len=512, max_tiles=8, image_size=56, num_frames=3)
    turns = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "bars"}]
    out = transform.map(RawRecord(json.dumps({"video": "clip.mp4", "conversations": turns}).encode(), "v.jsonl:1"))
    assert out["info"]["tiles"] == 3
    gone = transform.map(RawRecord(json.dumps({"video": "gone.mp4", "conversations": turns}).encode(), "v.jsonl:2"))
    assert gone["skip"] == "missing_video" and f"gs://{BUCKET}/videos/gone.mp4" in gone["error"]


def test_eval_video_tsv_and_videos_from_gcs(gcs, tmp_path):
    """A Video-MME-style TSV and its videos in the bucket: rows read from the URL, frames from the object."""
    from sail_jax.data.video import load_video
    from sail_jax.evaluation.data import read_tsv
    from tests.video_utils import write_video

    write_video(tmp_path / "a.mp4", 12)
    bench = as_path(f"gs://{BUCKET}/bench")
    (bench / "videos" / "a.mp4").write_bytes((tmp_path / "a.mp4").read_bytes())
    (bench / "v.tsv").write_text("index\tvideo\tquestion\tanswer\tA\tB\n0\tvideos/a.mp4\tWhat?\tA\tbars\tdots\n"
                                 "1\tvideos/gone.mp4\tWhat?\tB\tbars\tdots\n")
    items = read_tsv(f"gs://{BUCKET}/bench/v.tsv", num_frames=4)
    assert [i.video.path for i in items] == [f"gs://{BUCKET}/bench/videos/a.mp4", f"gs://{BUCKET}/bench/videos/gone.mp4"]
    assert load_video(items[0].video.path, 4).frames.shape[0] == 4
    with pytest.raises(FileNotFoundError, match=f"gs://{BUCKET}/bench/videos/gone.mp4"):
        load_video(items[1].video.path, 4)
    with pytest.raises(ValueError, match=f"gs://{BUCKET}/bench/bad.tsv: missing column"):
        (bench / "bad.tsv").write_text("index\tquestion\n0\tWhat?\n")
        read_tsv(f"gs://{BUCKET}/bench/bad.tsv")


def test_train_on_data_and_tokenizer_from_gcs(gcs, gcs_data, tmp_path):
    data, tok = gcs_data
    e = {**os.environ, **gcs, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
    args = [sys.executable, "-m", "sail_jax", "train", f"--gin_file={TINY_GIN}", f"--gin.WORKDIR='{tmp_path / 'run'}'",
            "--gin.DATA=@grain_data", f"--gin.grain_data.datasets=[{{'path': '{data}/train.jsonl'}}]",
            f"--gin.grain_data.tokenizer_dir='{tok}'", "--gin.grain_data.max_tiles=2", "--gin.grain_data.max_num=1",
            "--gin.grain_data.num_workers=0", "--gin.train.seq_len=256", "--gin.train.steps=2",
            "--gin.LLMConfig.vocab_size=151936", f"--gin.ModelConfig.img_context_token_id={IMG_CONTEXT_TOKEN_ID}",
            "--gin.train.trainable=('adapter',)", "--gin.CheckpointConfig.every_steps=100"]
    proc = subprocess.run(args, env=e, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    carried = tmp_path / "run" / "checkpoints" / "2" / "tokenizer" / "vocab.json"  # the tokenizer, fetched, carried
    assert carried.read_bytes() == (REPO / "assets/tokenizer/vocab.json").read_bytes()


def start(workdir: str, env: dict[str, str], log, *extra: str) -> subprocess.Popen:
    e = {**os.environ, **env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
    args = [sys.executable, DRIVER, "train", f"--gin_file={TINY_GIN}", f"--gin.WORKDIR='{workdir}'",
            "--gin.train.steps=3", "--gin.DATA=@slow_synthetic_data", "--gin.slow_synthetic_data.delay_s=0.5",
            f"--gin.train.tokenizer_dir='{REPO / 'assets' / 'tokenizer'}'", *extra]
    with log.open("w") as f:
        return subprocess.Popen(args, env=e, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


def test_train_kill_resume_convert_on_gcs(gcs, tmp_path, capsys):
    workdir = f"gs://{BUCKET}/run"
    first = as_path(workdir) / "checkpoints" / "1" / "commit_success.txt"  # Orbax's commit marker on object stores
    proc = start(workdir, gcs, tmp_path / "first.log")
    t0 = time.monotonic()
    while not first.exists():
        assert proc.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() - t0 < 300, "timed out waiting for the first checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL

    proc = start(workdir, gcs, tmp_path / "resume.log", "--resume")
    assert proc.wait(timeout=600) == 0, (tmp_path / "resume.log").read_text()
    log = (tmp_path / "resume.log").read_text()
    assert "steps 1..3" in log or "steps 2..3" in log, log

    run = as_path(workdir)
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    assert json.loads((run / "checkpoints" / "3" / "train_state" / "metadata").read_text())["step"] == 3
    assert "train.steps = 3" in (run / "config.gin").read_text()
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())

    # the workdir stands for its newest step; the upstream directory is written to gs:// too
    assert main(["convert", "orbax-to-hf", "--src", workdir, "--dst", f"gs://{BUCKET}/hf", "--no-progress"]) == 0
    hf = as_path(f"gs://{BUCKET}/hf")
    assert json.loads((hf / "config.json").read_text())["llm_config"]["vocab_size"] == 512
    assert (hf / "model.safetensors").exists()
    assert (hf / "vocab.json").read_bytes() == (REPO / "assets/tokenizer/vocab.json").read_bytes()
    # and an upstream directory on gs:// converts back (read through a local copy)
    back = tmp_path / "back"
    assert main(["convert", "hf-to-orbax", "--src", f"gs://{BUCKET}/hf", "--dst", str(back), "--no-progress"]) == 0
    assert (back / "params").is_dir() and (back / "model_config").is_dir()

    # commands run from the gs:// workdir alone (the tokenizer it carries is fetched)
    assert main(["info", "--checkpoint", workdir]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {workdir}/checkpoints/3: sail-jax (Orbax)" in out
    assert f"tokenizer: {workdir}/checkpoints/3/tokenizer" in out
    assert main(["generate", "--checkpoint", workdir, "--prompt", "Hello", "--max-new-tokens", "2"]) == 0
    assert "2 tokens (length)" in capsys.readouterr().err


def test_eval_names_the_model_from_a_checkpoint_path():
    from sail_jax.cli.eval import default_model_name

    assert default_model_name(f"gs://{BUCKET}/runs/sft/checkpoints/300") == "sft-step300"
    assert default_model_name(f"gs://{BUCKET}/runs/sft") == "sft"  # a workdir: its newest step
    assert default_model_name("runs/sft/checkpoints/3/") == "sft-step3"
    assert default_model_name("/ckpt/SAIL-VL2-2B") == "SAIL-VL2-2B"
