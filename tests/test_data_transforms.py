"""Per-sample transform: loss masks (default and Think-Fusion conditional), images and tile budgets, over-long
policies, and every kind of bad input becoming a located skip marker."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sail_jax.config import IMG_CONTEXT_TOKEN_ID
from sail_jax.data.sources import RawRecord
from sail_jax.data.transforms import SampleTransform, per_image_max_num, truncation_point

TILE = 56  # small tiles (4 tokens each) keep the tests fast; tiling itself is tested in test_tiling.py


@pytest.fixture
def make(data_dir, tmp_path):
    def build(**kw) -> SampleTransform:
        args = dict(tokenizer_dir=str(data_dir / "tokenizer"), image_root=str(tmp_path), dataset=0, seq_len=4096,
                    max_tiles=12, image_size=TILE)
        return SampleTransform(**{**args, **kw})

    return build


def record(obj, where: str = "d.jsonl:7") -> RawRecord:
    return RawRecord((obj if isinstance(obj, str) else json.dumps(obj)).encode(), where)


def conv(*turns: str, image=None) -> dict:
    out = {"id": "x", "conversations": [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(turns)]}
    if image is not None:
        out["image"] = image
    return out


def target_texts(t: SampleTransform, out: dict) -> list[str]:
    """The decoded runs of loss-masked tokens, one per assistant response."""
    ids, mask = out["input_ids"], out["loss_mask"]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [t.processor.tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False)
            for a, b in zip(edges[::2], edges[1::2])]


def save_image(tmp_path, name: str, size: tuple[int, int]) -> str:
    Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    return name


THINK_EMPTY = "<think>\n\n</think>\n\nblue"
THINK_COT = "<think>\nThe sky is blue by day.\n</think>\n\\boxed{blue}"


def test_default_mask_is_every_assistant_token_incl_think_and_im_end(make):
    t = make()
    out = t.map(record(conv("What colour?", THINK_EMPTY, "And why?", THINK_COT, "Thanks.", "ok")))
    assert target_texts(t, out) == [THINK_EMPTY + "<|im_end|>", THINK_COT + "<|im_end|>", "ok<|im_end|>"]
    assert out["loss_mask"].dtype == np.int32 and out["input_ids"].dtype == np.int32
    assert out["info"]["cot"] and not out["info"]["truncated"] and out["info"]["where"] == "d.jsonl:7"


# (loss_on, the targets of: a two-response sample (direct with an empty scaffold, then CoT), a plain answer)
LOSS_ON_CASES = [
    ("thought_and_answer", [THINK_EMPTY + "<|im_end|>", THINK_COT + "<|im_end|>"], ["blue<|im_end|>"]),
    ("conditional", ["blue<|im_end|>", THINK_COT + "<|im_end|>"], ["blue<|im_end|>"]),
    ("answer", ["blue<|im_end|>", "\\boxed{blue}<|im_end|>"], ["blue<|im_end|>"]),
]


@pytest.mark.parametrize("loss_on, mixed, plain", LOSS_ON_CASES)
def test_loss_on_selects_the_response_tokens_of_each_sample_kind(make, loss_on, mixed, plain):
    """Think-Fusion ("conditional"): direct answers train on the answer only, CoT samples on thought + answer."""
    t, default = make(loss_on=loss_on), make()
    sample = record(conv("What colour?", THINK_EMPTY, "And why?", THINK_COT))
    out, full = t.map(sample), default.map(sample)
    np.testing.assert_array_equal(out["input_ids"], full["input_ids"])
    assert target_texts(t, out) == mixed and out["info"]["cot"]
    assert not (out["loss_mask"] & ~full["loss_mask"]).any()  # only ever fewer targets than the default
    cot = t.map(record(conv("Why?", THINK_COT)))
    direct = t.map(record(conv("What colour?", THINK_EMPTY)))
    assert target_texts(t, cot) == mixed[1:] and cot["info"]["cot"]
    assert target_texts(t, direct) == mixed[:1] and not direct["info"]["cot"]
    # Without a think block a response trains on all of it in every mode.
    assert target_texts(t, t.map(record(conv("What colour?", "blue")))) == plain


def test_loss_on_is_checked(make):
    with pytest.raises(ValueError, match="loss_on='thought'; expected one of"):
        make(loss_on="thought")


def test_image_tokens_tiles_and_masks(make, tmp_path):
    t = make()
    wide = save_image(tmp_path, "wide.png", (112, 56))  # 2:1 -> 2 tiles + thumbnail
    out = t.map(record(conv("<image>\nWhat is it?", "a bar", image=wide)))
    assert out["pixel_values"].shape == (3, 3, TILE, TILE) and out["pixel_values"].dtype == np.float32
    ctx = out["input_ids"] == IMG_CONTEXT_TOKEN_ID
    assert ctx.sum() == 3 * 4 and not out["loss_mask"][ctx].any()
    assert target_texts(t, out) == ["a bar<|im_end|>"]
    # No marker at all: the image goes before the first user text (model.chat style), same tokens.
    no_marker = t.map(record(conv("What is it?", "a bar", image=[wide])))
    np.testing.assert_array_equal(no_marker["input_ids"], out["input_ids"])


def test_images_share_the_row_tile_budget(make, tmp_path):
    assert per_image_max_num(12, 1, 16) == 12 and per_image_max_num(12, 2, 16) == 7
    assert per_image_max_num(12, 3, 6) == 1 and per_image_max_num(12, 1, 4) == 3
    big = save_image(tmp_path, "big.png", (224, 224))  # up to 4x4 tiles at max_num 12
    t = make(max_tiles=6)
    out = t.map(record(conv("Image-1: <image>\nImage-2: <image>\nSame?", "yes", image=[big, big])))
    assert len(out["pixel_values"]) <= 6 and out["info"]["tiles"] == len(out["pixel_values"])
    assert (out["input_ids"] == IMG_CONTEXT_TOKEN_ID).sum() == 4 * len(out["pixel_values"])


def test_over_long_drop_and_truncate(make, tmp_path):
    img = save_image(tmp_path, "sq.png", (56, 56))
    sample = conv("<image>\nFirst?", "one", "<image>\nSecond?", "two", image=[img, img])
    full = make().map(record(sample))
    n = len(full["input_ids"])
    second_img = int(np.flatnonzero(full["input_ids"] == 151669)[1])
    dropped = make(seq_len=n - 3).map(record(sample))
    assert dropped["skip"] == "too_long" and dropped["where"] == "d.jsonl:7" and f"{n} tokens" in dropped["error"]
    cut = make(seq_len=n - 3, over_long="truncate").map(record(sample))  # cut in the text: both images stay
    np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][: n - 3])
    assert len(cut["pixel_values"]) == 2 and cut["info"]["truncated"] and cut["info"]["tokens"] == n - 3
    cut = make(seq_len=second_img + 3, over_long="truncate").map(record(sample))  # inside the 2nd image
    np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:second_img])
    assert len(cut["pixel_values"]) == 1 and target_texts(make(), cut) == ["one<|im_end|>"]
    # The tile budget is a limit too, and a truncation that leaves nothing to learn is a drop.
    assert make(max_tiles=1, over_long="truncate").map(record(sample))["info"]["tiles"] == 1
    nothing = make(seq_len=20, over_long="truncate").map(record(sample))
    assert nothing["skip"] == "too_long" and "no target token" in nothing["error"]
    assert truncation_point(np.arange(10), [], 4, 1) == (4, 0)


@pytest.mark.parametrize("reason, line, setup", [
    ("malformed", '{"id": 1, "conversations": [', None),
    ("malformed", '["not", "an", "object"]', None),
    ("malformed", {"conversations": [{"from": "robot", "value": "hi"}]}, None),
    ("malformed", {"conversations": [{"from": "human", "value": "hi"}]}, None),
    ("missing_image", conv("<image>\nWhat?", "x", image="nowhere.png"), None),
    ("bad_image", conv("<image>\nWhat?", "x", image="corrupt.png"), b"\x89PNG\r\n\x1a\n not really"),
    ("bad_image", conv("<image>\nWhat?", "x", image="corrupt.png"), "truncate"),
    ("image_mismatch", conv("<image>\n<image>\nWhat?", "x", image="ok.png"), None),
    ("image_mismatch", conv("<image>\nWhat?", "x"), None),
])
def test_bad_input_becomes_a_located_skip_marker(make, tmp_path, reason, line, setup):
    save_image(tmp_path, "ok.png", (56, 56))
    if isinstance(setup, bytes):
        (tmp_path / "corrupt.png").write_bytes(setup)
    elif setup == "truncate":
        noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "full.png")
        data = (tmp_path / "full.png").read_bytes()
        (tmp_path / "corrupt.png").write_bytes(data[: len(data) // 2])
    out = make().map(record(line, "bad.jsonl:12"))
    assert out["skip"] == reason and out["where"] == "bad.jsonl:12" and out["dataset"] == 0 and out["error"]
