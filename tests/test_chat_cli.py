"""`sail-jax generate` and `sail-jax chat` on the tiny fixture checkpoint made by the original implementation."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from converters.load import load_checkpoint
from sail_jax.cli import main
from sail_jax.cli.chat import ChatSession, converse
from sail_jax.config import RuntimeConfig
from sail_jax.data.processor import SailProcessor
from sail_jax.inference.engine import Engine, Request
from sail_jax.inference.sampling import SamplingParams
from sail_jax.inference.text import decode_response
from tests.conftest import DATA

FIX = DATA / "sailvl2-tiny"
CKPT = str(FIX / "checkpoint")


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "square.png"
    img = Image.new("RGB", (448, 448), "white")
    ImageDraw.Draw(img).rectangle((100, 100, 300, 300), fill="orange")
    img.save(path)
    return path


def test_generate_prints_the_original_greedy_tokens(capsys):
    prompts = json.loads((FIX / "prompts.json").read_text())
    ref = np.load(FIX / "outputs.npz")["generated_ids"][0].tolist()
    rc = main(["generate", "--checkpoint", CKPT, "--image", str(FIX / prompts["images"][0]), "--prompt",
               prompts["question"], "--greedy", "--max-new-tokens", "16", "--print-ids"])
    assert rc == 0
    text, ids = capsys.readouterr().out.rstrip("\n").split("\n")
    assert json.loads(ids) == ref
    assert text == prompts["generated_text"].strip()


def test_generate_batch_mode(tmp_path, small_image, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(small_image.read_bytes())
    reqs = tmp_path / "requests.jsonl"
    reqs.write_text(json.dumps({"id": "q1", "prompt": "Describe it.", "images": ["imgs/a.png"]}) + "\n\n"
                    + json.dumps({"id": 2, "prompt": "Hello!"}) + "\n")
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--checkpoint", CKPT, "--batch", str(reqs), "--out", str(out), "--max-new-tokens",
                 "3"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == ["q1", 2]
    assert all(set(a) == {"id", "text", "token_ids"} and len(a["token_ids"]) <= 3 for a in answers)
    tok = SailProcessor.from_dir(CKPT).tokenizer
    assert [a["text"] for a in answers] == [decode_response(tok, a["token_ids"]) for a in answers]
    assert "wrote 2 answers" in capsys.readouterr().err

    reqs.write_text(json.dumps({"id": 1, "prompt": "ok"}) + "\n" + json.dumps({"id": 2}) + "\n")
    assert main(["generate", "--checkpoint", CKPT, "--batch", str(reqs), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "requests.jsonl line 2: missing key 'prompt'" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", CKPT, "--prompt", "hi", "--top-k", "5"]) == 2
    assert "--top-k / --top-p only apply when sampling" in capsys.readouterr().err


def test_chat_one_shot_equals_generate(small_image, capsys):
    common = ["--checkpoint", CKPT, "--image", str(small_image), "--max-new-tokens", "4"]
    assert main(["generate", *common, "--prompt", "What shape?", "--print-ids"]) == 0
    text, _ = capsys.readouterr().out.rstrip("\n").split("\n")
    assert main(["chat", *common, "--prompt", "What shape?"]) == 0
    assert capsys.readouterr().out.strip() == text


def test_chat_scripted_multi_turn(small_image):
    cfg, params = load_checkpoint(CKPT, RuntimeConfig())
    from sail_jax.models.sail_vl import SailVL

    engine = Engine(SailVL(cfg), params)
    proc = SailProcessor.from_dir(CKPT)
    sampling = SamplingParams(max_new_tokens=4)
    session = ChatSession(engine, proc, [str(small_image)], thinking=False, sampling=sampling)
    stdout = io.StringIO()
    script = "What is this?\n\nTell me more.\n/reset\nWhat is this?\n/exit\nnever asked\n"
    assert converse(session, io.StringIO(script), stdout, io.StringIO(), interactive=False) == 0
    # after /reset the history holds the third question only
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    a3 = session.history[1]["content"]

    # turn 2 was generated on the univl-chat rendering of [q1, a1, q2] with the image on the first turn
    first = {"role": "user", "content": "What is this?"}
    enc1 = proc.encode_conversation([first], [str(small_image)], add_generation_prompt=True)
    a1 = decode_response(proc.tokenizer, engine.generate([Request(enc1["input_ids"], enc1["pixel_values"])],
                                                         sampling)[0].token_ids)
    conv = [first, {"role": "assistant", "content": a1}, {"role": "user", "content": "Tell me more."}]
    enc2 = proc.encode_conversation(conv, [str(small_image)], add_generation_prompt=True)
    assert enc2["input_ids"].tolist().count(151644) == 5  # system, user, assistant, user, open assistant turn
    a2 = decode_response(proc.tokenizer, engine.generate([Request(enc2["input_ids"], enc2["pixel_values"])],
                                                         sampling)[0].token_ids)
    assert a3 == a1  # a fresh conversation asks the same first question again
    out = stdout.getvalue()  # three streamed answers, each ended by a newline
    assert out.endswith("\n") and out.count("\n") >= 3
    second = out.index(a1) + len(a1)
    assert out.index(a2, second) >= second and out.rstrip("\n").endswith(a3)


def test_chat_commands_media_and_bad_lines(small_image):
    """Commands are run, not sent; a line of invalid UTF-8 is refused and the conversation goes on."""
    cfg, params = load_checkpoint(CKPT, RuntimeConfig())
    from sail_jax.models.sail_vl import SailVL

    session = ChatSession(Engine(SailVL(cfg), params), SailProcessor.from_dir(CKPT), [], thinking=False,
                          sampling=SamplingParams(max_new_tokens=3))
    script = (b"Hi\n/help\n/bogus and more\n\xff\xfe broken \xc3\n/image\n/image /no/such.png\n"
              + f"/image {small_image}\n".encode() + "What is it? ünïcode\n//not a command\n/exit\n".encode())
    stdin, stdout, stderr = io.TextIOWrapper(io.BytesIO(script)), io.StringIO(), io.StringIO()
    assert converse(session, stdin, stdout, stderr, interactive=False) == 0
    err = stderr.getvalue()
    assert "/image PATH" in err and "/reset" in err  # /help lists the table
    assert "unknown command /bogus: not sent to the model" in err
    assert "that line is not valid UTF-8: not sent" in err
    assert "/image: usage: /image PATH" in err and "/no/such.png: no such image file" in err
    assert f"{small_image}: attached to your next message" in err
    users = [m["content"] for m in session.history if m["role"] == "user"]
    # three questions reached the model; the image went with the one after /image, a // line lost one slash
    assert users == ["Hi", "<image>\nWhat is it? ünïcode", "/not a command"]
    assert session.images == [str(small_image)] and stdout.getvalue().count("\n") == 3
