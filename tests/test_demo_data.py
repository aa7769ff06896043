"""`sail-jax make-demo-data`: byte-identical output per seed, a small closed answer vocabulary, every sample kind,
one tile per (square) image, and records that all pass the training transform."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sail_jax.cli import main as cli_main
from sail_jax.data.images import dynamic_preprocess
from sail_jax.data.sources import JsonlSource
from sail_jax.data.transforms import SampleTransform
from sail_jax.evaluation.demo import COLORS, SHAPES, SIZES, make_demo_data

ANSWERS = set(COLORS) | set(SHAPES) | {"0", "1", "2", "3", "4", "left", "right", "top", "bottom", "yes", "no",
                                       "first", "second"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli_main(["make-demo-data", "--out", str(out), "--n", "60", "--seed", "3"]) == 0
    return out


def files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(demo, tmp_path):
    make_demo_data(tmp_path / "again", n=60, seed=3)
    assert files(tmp_path / "again") == files(demo)
    make_demo_data(tmp_path / "other", n=60, seed=4)
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (demo / "train.jsonl").read_bytes()


def test_splits_kinds_and_answers(demo):
    train = [json.loads(line) for line in (demo / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (demo / "heldout.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (demo / "heldout_eval.jsonl").read_text().splitlines()]
    assert len(train) == 60 and len(heldout) == 6 and evals
    assert not {json.dumps(r["image"]) for r in train if "image" in r} & {json.dumps(r["image"]) for r in heldout}
    answers = [t["value"] for r in train for t in r["conversations"] if t["from"] == "gpt"]
    thinking = [a for a in answers if a.startswith("<think>")]
    assert thinking and all("</think>" in a and "\\boxed{" in a for a in thinking)
    assert any(isinstance(r.get("image"), list) and len(r["image"]) == 2 for r in train)  # multi-image
    assert any("image" not in r for r in train)  # text-only
    assert any(len(r["conversations"]) == 4 for r in train)  # two turns
    short = [a for a in answers if " " not in a and not a.startswith("<think>")]
    assert set(short) <= ANSWERS and len(set(short)) > 8
    for item in evals:
        assert set(item) == {"id", "image", "question", "answer", "type"} and item["answer"] in ANSWERS
        assert item["question"].count("<image>") == len(item["image"])
    assert Counter(e["type"] for e in evals).keys() <= {"count", "color", "shape", "position", "yesno", "multi",
                                                        "text"}


def test_images_are_small_and_every_record_transforms(demo, data_dir):
    for w, h in SIZES:
        tiles, _ = dynamic_preprocess(Image.new("RGB", (w, h)), 1, 12, 448)
        assert len(tiles) == 1
    t = SampleTransform(tokenizer_dir=str(data_dir / "tokenizer"), image_root=str(demo), dataset=0, seq_len=1024,
                        max_tiles=8, image_size=56)
    outs = []
    for name in ("train.jsonl", "heldout.jsonl"):
        src = JsonlSource(demo / name)
        outs += [t.map(src[i]) for i in range(len(src))]
    assert not [o for o in outs if "skip" in o]
    assert max(len(o["pixel_values"]) for o in outs) <= 8
    assert np.mean([o["info"]["cot"] for o in outs]) == pytest.approx(0.15, abs=0.05)


def test_captions_and_thoughts_list_shapes_in_reading_order(demo):
    """Multi-shape captions and CoT thoughts name the shapes top row first, left to right, so the list is a
    function of the image (checked against the colour drawn at each grid cell's centre)."""
    colour_of = {rgb: name for name, rgb in COLORS.items()}
    checked = 0
    for line in (demo / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        answer = r["conversations"][1]["value"]
        found = re.search(r"shapes?: (.*?)\.", answer)
        if not found or "image" not in r or isinstance(r["image"], list) or " and " not in found.group(1):
            continue  # not a caption / thought, or a lone shape
        image = Image.open(demo / r["image"]).convert("RGB")
        w, h = image.size
        at_cells = [colour_of.get(image.getpixel((int(fx * w), int(fy * h)))) for fy in (0.25, 0.75)
                    for fx in (0.25, 0.75)]
        named = [phrase.split()[-2] for phrase in found.group(1).replace(" and ", ", ").split(", ")]
        assert named == [c for c in at_cells if c], (r["id"], answer, at_cells)
        checked += 1
    assert checked >= 3
