"""Video through the commands: `preprocess --video` (npz contents, errors), `generate --video` and batch "video"
requests, chat `/video`, and `eval` on a video MCQ TSV, on the tiny fixture checkpoint (448-px tiles) with generated
videos of 2 sampled frames."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from converters.load import load_checkpoint
from sail_jax.cli import main
from sail_jax.cli.chat import ChatSession, converse
from sail_jax.config import RuntimeConfig
from sail_jax.data.chat import IMG_CONTEXT_TOKEN, image_tokens
from sail_jax.data.processor import SailProcessor
from sail_jax.data.video import (
    MCQ_INSTRUCTION,
    fps_frame_indices,
    index_video,
    load_video,
    read_frames,
    uniform_frame_indices,
    video_pixel_values,
)
from sail_jax.evaluation.data import read_tsv
from sail_jax.evaluation.scoring import extract_choice
from sail_jax.inference.engine import Engine, Request
from sail_jax.inference.sampling import SamplingParams
from sail_jax.models.sail_vl import SailVL
from tests.conftest import DATA
from tests.video_utils import read_index, write_bad_videos, write_video

CKPT = str(DATA / "sailvl2-tiny" / "checkpoint")
TOKENIZER = DATA / "tokenizer"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    (d / "videos").mkdir()
    return {"a": write_video(d / "videos" / "a.mp4", 50), "b": write_video(d / "videos" / "b.mp4", 21)}


def frame_text(num_frames: int) -> str:
    return "".join(f"Frame-{k}: {image_tokens(1)}\n" for k in range(1, num_frames + 1))


@pytest.mark.parametrize("mode,expected", [(["--num-frames", "5"], uniform_frame_indices(50, 5)),
                                           (["--fps", "2"], fps_frame_indices(50, 30.0, 2.0))])
def test_preprocess_writes_the_sampled_frames_as_one_tile_each(clips, tmp_path, capsys, mode, expected):
    out = tmp_path / "v.npz"
    assert main(["preprocess", "--tokenizer", str(TOKENIZER), "--video", str(clips["a"]), *mode,
                 "--prompt", "What happens?", "--out", str(out)]) == 0
    assert f"{len(expected)} frames {expected.tolist()} of 50" in capsys.readouterr().out
    z = np.load(out)
    assert set(z.files) == {"input_ids", "pixel_values", "num_patches_list", "frame_indices"}
    n = len(expected)
    assert z["frame_indices"].tolist() == expected.tolist() and z["num_patches_list"].tolist() == [1] * n
    assert z["pixel_values"].shape == (n, 3, 448, 448) and z["pixel_values"].dtype == np.float32
    # The tiles are those frames: the decoder's frames show their own indices, and tile k is frame k's tile.
    frames = read_frames(index_video(clips["a"]), expected)
    assert [read_index(f) for f in frames] == expected.tolist()
    np.testing.assert_array_equal(z["pixel_values"], video_pixel_values(frames))
    tok = SailProcessor.from_dir(TOKENIZER).tokenizer
    text = tok.decode(z["input_ids"][0].tolist(), skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\n" + frame_text(n) + "What happens?<|im_end|><|im_start|>assistant\n")
    assert text.count(IMG_CONTEXT_TOKEN) == 256 * n


def test_preprocess_refuses_each_bad_video_in_one_line(tmp_path, capsys):
    for kind, path in write_bad_videos(tmp_path).items():
        out = tmp_path / f"{kind}.npz"
        assert main(["preprocess", "--tokenizer", str(TOKENIZER), "--video", str(path), "--prompt", "Q",
                     "--out", str(out)]) == 2, kind
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sail-jax preprocess: error: ") and path.name in err, err
        assert not out.exists()
    good = write_video(tmp_path / "ok.mp4", 10)
    assert main(["preprocess", "--tokenizer", str(TOKENIZER), "--video", str(good), "--image", str(good),
                 "--prompt", "Q", "--out", str(tmp_path / "x.npz")]) == 2
    assert "--video takes neither --image" in capsys.readouterr().err


@pytest.fixture(scope="module")
def engine():
    cfg, params = load_checkpoint(CKPT, RuntimeConfig())
    return Engine(SailVL(cfg), params), SailProcessor.from_dir(CKPT)


def test_generate_chat_and_batch_take_a_video(clips, engine, tmp_path, capsys):
    eng, proc = engine
    sampling = SamplingParams(max_new_tokens=3)
    video = load_video(clips["a"], 2)
    enc = proc.encode_video([{"role": "user", "content": "What happens?"}], video, add_generation_prompt=True)
    ref = eng.generate([Request(enc["input_ids"], enc["pixel_values"])], sampling)[0].token_ids

    common = ["--checkpoint", CKPT, "--video", str(clips["a"]), "--num-frames", "2", "--max-new-tokens", "3"]
    assert main(["generate", *common, "--prompt", "What happens?", "--print-ids"]) == 0
    text, ids = capsys.readouterr().out.rstrip("\n").split("\n")
    assert json.loads(ids) == ref
    assert main(["chat", *common, "--prompt", "What happens?"]) == 0
    assert capsys.readouterr().out.strip() == text

    # chat: /video starts a conversation about the video (the same first answer); a bad path is reported, not fatal
    session = ChatSession(eng, proc, [], thinking=False, sampling=sampling)
    stderr = io.StringIO()
    script = f"/video {tmp_path / 'missing.mp4'}\n/video {clips['a']}\nWhat happens?\n/exit\n"
    assert converse(session, io.StringIO(script), io.StringIO(), stderr, interactive=False,
                    load_video=lambda p: load_video(p, 2)) == 0
    assert "/video: video file not found" in stderr.getvalue() and "missing.mp4" in stderr.getvalue()
    assert session.video is not None and session.history[1]["content"] == text

    # batch: a "video" request beside a text one, paths relative to the requests file
    reqs = tmp_path / "requests.jsonl"
    reqs.write_text(json.dumps({"id": "v", "prompt": "What happens?", "video": str(clips["a"].relative_to(
        clips["a"].parents[1]).as_posix())}) + "\n" + json.dumps({"id": "t", "prompt": "Hello"}) + "\n")
    (tmp_path / "videos").symlink_to(clips["a"].parent)
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--checkpoint", CKPT, "--batch", str(reqs), "--out", str(out), "--num-frames", "2",
                 "--max-new-tokens", "3"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert answers[0]["id"] == "v" and answers[0]["token_ids"] == ref
    reqs.write_text(json.dumps({"id": "v", "prompt": "Q", "video": "videos/none.mp4"}) + "\n")
    # A bad request is that request's error line, the batch goes on, the exit status says one failed.
    assert main(["generate", "--checkpoint", CKPT, "--batch", str(reqs), "--out", str(out)]) == 1
    assert "requests.jsonl line 1: video file not found" in capsys.readouterr().err
    [answer] = [json.loads(line) for line in out.read_text().splitlines()]
    assert answer["id"] == "v" and "video file not found" in answer["error"]


def write_tsv(path, rows: list[dict]) -> None:
    cols = list(rows[0])
    path.write_text("\t".join(cols) + "\n" + "".join("\t".join(str(r[c]) for c in cols) + "\n" for r in rows))


def test_eval_on_a_video_mcq_tsv(clips, tmp_path, capsys):
    root = clips["a"].parents[1]
    rows = [
        {"index": 0, "video": "videos/a.mp4", "question": "What moves?", "task_type": "Action",
         "candidates": "['A. bars', 'B. a cat', 'C. nothing']", "answer": "A"},
        {"index": 1, "video": "videos/b.mp4", "question": "How many colours?", "task_type": "Counting",
         "candidates": "['one', 'two']", "answer": "B"},
        {"index": 2, "video": "videos/a.mp4", "question": "Is it dark?", "task_type": "Action",
         "candidates": "['A. yes', 'B. no']", "answer": "B"},
    ]
    tsv = tmp_path / "Video-MME.tsv"
    write_tsv(tsv, rows)
    items = read_tsv(tsv, root, num_frames=2)
    assert [i.options for i in items] == [{"A": "bars", "B": "a cat", "C": "nothing"}, {"A": "one", "B": "two"},
                                          {"A": "yes", "B": "no"}]
    assert items[1].video.path == str(root / "videos" / "b.mp4") and items[1].category == "Counting"
    out = tmp_path / "result.json"
    assert main(["eval", "--checkpoint", CKPT, "--data", str(tsv), "--data-root", str(root), "--kind", "mcq",
                 "--num-frames", "2", "--max-new-tokens", "4", "--batch-size", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3 and set(result["per_category"]) == {"Action", "Counting"}
    assert result["per_category"]["Action"]["n"] == 2
    for item, rec in zip(items, result["items"]):
        options = "".join(f"\n{k}. {v}" for k, v in item.options.items())
        assert rec["prompt"] == ("Frame-1: <image>\nFrame-2: <image>\n" + item.question + options + MCQ_INSTRUCTION)
        assert rec["tiles"] == [1, 1]
        choice = extract_choice(rec["prediction"], item.options)
        assert rec["extracted"] == choice and rec["correct"] == (choice == item.answers[0])
    assert result["correct"] == sum(r["correct"] for r in result["items"])
    write_tsv(tsv, [{**rows[0], "video": "videos/gone.mp4"}])
    # An unusable row is recorded with its error (the run goes on) and the exit status is 1.
    assert main(["eval", "--checkpoint", CKPT, "--data", str(tsv), "--data-root", str(root), "--kind", "mcq",
                 "--out", str(tmp_path / "gone.json")]) == 1
    err = capsys.readouterr().err
    assert "row 1 (index 0): column 'video': video file not found" in err, err
    [record] = json.loads((tmp_path / "gone.json").read_text())["items"]
    assert "video file not found" in record["error"]
