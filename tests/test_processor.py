"""Processor and `sail-jax preprocess`: exact parity with the original processor's fixture outputs, the token-id anchor
of the rendered chat prompt, settings precedence, multi-image, loss masks and bad input."""

from __future__ import annotations

import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from sail_jax.cli import main as cli_main
from sail_jax.config import IMG_CONTEXT_TOKEN_ID
from sail_jax.data import chat
from sail_jax.data.processor import SailProcessor

FIXTURE = "sailvl2-tiny"


def render(messages, system=None, add_generation_prompt=True) -> str:
    """The rendered prompt text: the concatenated `chat.render_segments`."""
    return "".join(s.text for s in chat.render_segments(messages, system, add_generation_prompt))


@pytest.fixture(scope="module")
def proc(data_dir):
    return SailProcessor.from_dir(data_dir / "tokenizer")


@pytest.fixture(scope="module")
def fixture_case(data_dir):
    root = data_dir / FIXTURE
    prompts = json.loads((root / "prompts.json").read_text())
    return {
        "image": root / prompts["images"][0],
        "question": prompts["question"],
        "inputs": dict(np.load(root / "inputs.npz")),
        "ref": dict(np.load(root / "preprocess_reference.npz")),
    }


def assert_matches_fixture(out: dict, case: dict) -> None:
    ref, inputs = case["ref"], case["inputs"]
    assert out["input_ids"].dtype == np.int32 and out["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(out["input_ids"], inputs["input_ids"])
    np.testing.assert_allclose(out["pixel_values"], ref["pixel_values_fp32_before_bf16_cast"], rtol=0, atol=1e-5)
    bf16 = out["pixel_values"].astype(ml_dtypes.bfloat16).astype(np.float32)
    with np.errstate(divide="ignore"):
        step = 2.0 ** (np.floor(np.log2(np.abs(inputs["pixel_values"]))) - 7)
    assert np.all(np.abs(bf16 - inputs["pixel_values"]) <= step)
    for key in ("num_patches_list", "tile_grids", "image_sizes"):
        np.testing.assert_array_equal(out[key], ref[key])
        np.testing.assert_array_equal(out[key], inputs[key])


def test_fixture_parity(proc, fixture_case):
    out = proc(images=[fixture_case["image"]], prompt=fixture_case["question"])
    assert set(out) == {"input_ids", "pixel_values", "num_patches_list", "tile_grids", "image_sizes"}
    assert_matches_fixture(out, fixture_case)
    # The same via a PIL image and via the checkpoint directory's own tokenizer/processor files.
    with Image.open(fixture_case["image"]) as pil:
        np.testing.assert_array_equal(proc(images=[pil], prompt=fixture_case["question"])["input_ids"],
                                      out["input_ids"])


def test_checkpoint_dir_settings(data_dir, fixture_case):
    proc = SailProcessor.from_dir(data_dir / FIXTURE / "checkpoint")
    assert proc.max_num == 10 and not proc.msac  # preprocessor_config.json, not config.json's 12
    assert_matches_fixture(proc(images=[fixture_case["image"]], prompt=fixture_case["question"]), fixture_case)


def test_cli_parity(data_dir, fixture_case, tmp_path, capsys):
    out_path = tmp_path / "sub" / "inputs.npz"
    rc = cli_main(["preprocess", "--tokenizer", str(data_dir / "tokenizer"), "--image", str(fixture_case["image"]),
                   "--prompt", fixture_case["question"], "--out", str(out_path)])
    assert rc == 0 and "1849 tokens, 7 tiles" in capsys.readouterr().out
    assert_matches_fixture(dict(np.load(out_path)), fixture_case)
    assert [p.name for p in out_path.parent.iterdir()] == ["inputs.npz"]  # the temporary file was renamed away


def test_token_id_anchor(proc):
    ids = proc(images=[Image.new("RGB", (448, 448), (90, 120, 30))], prompt="describe the image")["input_ids"][0]
    assert ids.shape == (302,)
    assert ids[:3].tolist() == [151644, 8948, 198]
    assert ids[3:6].tolist() == [56568, 104625, 108782] and ids[31] == 1773
    assert ids[32:37].tolist() == [151645, 151644, 872, 198, 151669]
    assert np.all(ids[37:293] == IMG_CONTEXT_TOKEN_ID)
    assert ids[293:].tolist() == [151670, 198, 12332, 279, 2168, 151645, 151644, 77091, 198]


def test_overrides_thinking_and_msac(data_dir, fixture_case):
    proc = SailProcessor.from_dir(data_dir / "tokenizer", max_num=12, msac=None)
    assert proc.max_num == 12 and not proc.msac
    out = proc(images=[fixture_case["image"]], prompt="q", thinking=True, system="S")
    assert out["tile_grids"].tolist() == [[4, 3]] and out["num_patches_list"].tolist() == [13]
    expected = (
        "<|im_start|>system\nS<|im_end|><|im_start|>user\n" + chat.image_tokens(13)
        + "\nq\n" + chat.THINKING_INSTRUCTION + "<|im_end|><|im_start|>assistant\n"
    )
    assert out["input_ids"][0].tolist() == proc.tokenizer.encode(expected)
    msac = dataclasses.replace(proc, max_num=10, msac=True)
    single = msac(images=[fixture_case["image"]], prompt="q")
    assert single["num_patches_list"].tolist() == [6 + 4 + 1]  # (3,2) + (2,2) + thumbnail
    assert single["tile_grids"].tolist() == [[3, 2]]
    double = msac(images=[fixture_case["image"]] * 2, prompt="q")  # MSAC is for single images only
    assert double["num_patches_list"].tolist() == [7, 7]
    with pytest.raises(TypeError, match="unknown"):
        SailProcessor.from_dir(data_dir / "tokenizer", max_tiles=3)
    with pytest.raises(ValueError, match="max_num=0"):
        dataclasses.replace(proc, max_num=0)
    # A lone path is one image, not a sequence of characters.
    assert proc.preprocess_images(str(fixture_case["image"]))["num_patches_list"].tolist() == [13]


def test_multi_image_and_text_only(proc):
    images = [Image.new("RGB", (896, 448)), Image.new("L", (300, 300))]
    out = proc(images=images, prompt="compare")
    assert out["num_patches_list"].tolist() == [3, 1] and out["pixel_values"].shape == (4, 3, 448, 448)
    assert out["tile_grids"].tolist() == [[2, 1], [1, 1]] and out["image_sizes"].tolist() == [[896, 448], [300, 300]]
    ids = out["input_ids"][0]
    assert (ids == IMG_CONTEXT_TOKEN_ID).sum() == 256 * 4
    text = proc.tokenizer.decode(ids, skip_special_tokens=False)
    assert f"user\n<img>{chat.image_tokens(3)[5:-6]}</img>\n<img>" in text
    # Markers in the text place the images there; nothing is prepended then.
    placed = proc(images=images, prompt="A: <image> B: <image> which?")
    placed_text = proc.tokenizer.decode(placed["input_ids"][0], skip_special_tokens=False)
    assert "user\nA: <img>" in placed_text and "</img> B: <img>" in placed_text
    empty = proc(prompt="hi")
    assert empty["pixel_values"].shape == (0, 3, 448, 448) and empty["num_patches_list"].shape == (0,)
    assert empty["tile_grids"].shape == (0, 2) and empty["input_ids"].shape[0] == 1


def test_conversation_loss_mask(proc):
    msgs = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "<think>\nround\n</think>\nA ball."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Red."},
    ]
    enc = proc.encode_conversation(msgs, images=[Image.new("RGB", (448, 448))])
    ids, mask = enc["input_ids"], enc["loss_mask"]
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    tok = proc.tokenizer
    runs, current = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    decoded = [tok.decode(r, skip_special_tokens=False) for r in runs]
    assert decoded == ["<think>\nround\n</think>\nA ball.<|im_end|>", "Red.<|im_end|>"]
    assert not mask[ids == IMG_CONTEXT_TOKEN_ID].any()
    # The whole id sequence is exactly the tokenization of the rendered, expanded prompt.
    full = chat.expand_images([render(msgs, add_generation_prompt=False)], [1])[0]
    assert ids.tolist() == tok.encode(full)
    # No <image> marker anywhere: prepended to the first user message (model.chat style).
    plain = proc.encode_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                     images=[Image.new("RGB", (448, 448))])
    assert tok.decode(plain["input_ids"], skip_special_tokens=False).count("user\n<img>") == 1
    with pytest.raises(ValueError, match="no user message"):
        proc.encode_conversation([{"role": "assistant", "content": "x"}], images=[Image.new("RGB", (8, 8))])


def test_bad_inputs(proc, tmp_path, fixture_case, data_dir, capsys):
    image = fixture_case["image"]
    with pytest.raises(ValueError, match="2 <image> placeholder.* 1 image"):
        proc(images=[image], prompt="<image> and <image>")
    with pytest.raises(ValueError, match="1 <image> placeholder.* 2 image"):
        proc(images=[image, image], prompt="only <image>")
    with pytest.raises(ValueError, match="1 <image> placeholder.* 0 image"):
        proc(prompt="<image> without images")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        proc(images=[tmp_path / "missing.png"], prompt="q")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 garbage")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        proc(images=[corrupt], prompt="q")
    for mode in ("RGBA", "L", "CMYK"):
        out = proc(images=[Image.open(image).convert(mode)], prompt="q")
        assert out["pixel_values"].shape == (7, 3, 448, 448) and np.isfinite(out["pixel_values"]).all()
    capsys.readouterr()
    rc = cli_main(["preprocess", "--tokenizer", str(data_dir / "tokenizer"), "--image", str(corrupt),
                   "--prompt", "q", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "corrupt.jpg" in err and not (tmp_path / "x.npz").exists()
    rc = cli_main(["preprocess", "--tokenizer", str(data_dir / "tokenizer"), "--image", str(image), "--image",
                   str(image), "--msac", "--prompt", "q", "--out", str(tmp_path / "x.npz")])
    assert rc == 2 and "single image" in capsys.readouterr().err
