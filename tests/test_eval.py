"""Evaluation harness: scorers and thinking helpers on known predictions, VLMEvalKit TSV reading and prompt building,
and an end-to-end `sail-jax eval` run with the tiny fixture model on a generated TSV."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image, ImageDraw

from sail_jax.cli import main
from sail_jax.evaluation.data import Item, build_prompt, read_tsv, tiling
from sail_jax.evaluation.scoring import (
    HME_CATEGORY,
    extract_choice,
    extract_yes_no,
    normalize_answer,
    ocr_match,
    score_item,
    summarize,
    vqa_match,
)
from sail_jax.inference.thinking import THINKING_INSTRUCTION, extract_answer, extract_boxed, split_thinking
from tests.conftest import DATA

CKPT = DATA / "sailvl2-tiny" / "checkpoint"
OPTIONS = {"A": "red circle", "B": "blue square", "C": "dark red circle", "D": "green"}
MCQ_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


@pytest.mark.parametrize("prediction, expected", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("B) blue square", "B"), ("C: dark red", "C"),
    ("The answer is B", "B"), ("answer: (D).", "D"), ("I think it is D, the green one", "D"),
    ("blue square", "B"), ("It looks like a dark red circle.", "C"),  # longest option text containing the others
    ("green or blue square", None), ("A or B", None), ("no idea", None), ("", None),
])
def test_extract_choice(prediction, expected):
    assert extract_choice(prediction, OPTIONS) == expected


def test_vqa_normalisation_and_match():
    assert normalize_answer("The  Two dogs.") == "2 dogs"
    assert normalize_answer("1,000") == "1000" and normalize_answer("3.5") == "3.5"
    assert normalize_answer("Don't!") == "dont"
    assert vqa_match("Two.", ["2"]) and vqa_match("a Cat", ["dog", "cat"])
    assert not vqa_match("two cats", ["2"])


def test_ocr_containment():
    assert ocr_match("The sign says STOP here", ["stop"])
    assert ocr_match("total: 12.50", ["$12.50", "12.50"])
    assert not ocr_match("go", ["stop"]) and not ocr_match("anything", [""])
    assert ocr_match("x ^ {2} + 1", ["x^{2}+1"], HME_CATEGORY)
    assert not ocr_match("X^{2}+1", ["x^{2}+1"], HME_CATEGORY)  # formulas keep their case


def test_score_item_and_summary():
    assert score_item("mcq", "(C)", ["C"], OPTIONS) == (True, "C")
    assert score_item("mcq", "A", ["C"], OPTIONS) == (False, "A")
    assert score_item("vqa", "Three", ["3"]) == (True, "3")
    assert score_item("ocr", "Hello World", ["hello"]) == (True, None)
    assert score_item("yn", "Yes, it is.", ["Yes"]) == (True, "Yes") and extract_yes_no("yes and no") is None
    with pytest.raises(ValueError, match="unknown evaluation kind"):
        score_item("caption", "x", ["x"])
    s = summarize([{"correct": True, "category": "a"}, {"correct": False, "category": "a"},
                   {"correct": True, "category": "b"}])
    assert (s["n"], s["correct"]) == (3, 2) and abs(s["accuracy"] - 2 / 3) < 1e-12
    assert s["per_category"] == {"a": {"n": 2, "correct": 1, "accuracy": 0.5},
                                 "b": {"n": 1, "correct": 1, "accuracy": 1.0}}


def test_thinking_helpers():
    text = "<think>try \\boxed{1} first</think> so \\boxed{\\frac{1}{2}} and later \\boxed{9}"
    assert split_thinking(text) == ("try \\boxed{1} first", "so \\boxed{\\frac{1}{2}} and later \\boxed{9}")
    assert extract_answer(text) == "\\frac{1}{2}"  # the first box after </think>
    assert extract_boxed(text) == "9"  # the last box
    assert extract_answer("no think: \\boxed{a{b}c} then \\boxed{d}") == "d"
    assert extract_answer("<think>only \\boxed{x}</think> none after") == "x"  # falls back to the last box
    assert extract_boxed("\\boxed{unclosed") is None and extract_answer("plain") is None
    assert split_thinking("plain answer ") == ("", "plain answer")
    assert split_thinking("started inside</think>answer") == ("started inside", "answer")
    assert THINKING_INSTRUCTION.endswith("The final answer MUST BE put in \\boxed{}.")


def png_b64(color: str, shape: str = "circle", size: tuple[int, int] = (448, 448)) -> str:
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, columns, delimiter="\t")
        w.writeheader()
        w.writerows(rows)


@pytest.fixture()
def mcq_tsv(tmp_path):
    red, blue = png_b64("red"), png_b64("blue", "square")
    rows = [
        {"index": 0, "image": red, "question": "What colour is the shape?", "hint": "Look closely.", "A": "red",
         "B": "blue", "C": "", "D": "", "answer": "A", "category": "colour"},
        {"index": 1, "image": blue, "question": "Which shape is it?", "hint": "", "A": "circle", "B": "square",
         "C": "triangle", "D": "", "answer": "B", "category": "shape"},
        {"index": 2, "image": json.dumps([red, blue]), "question": "Which image has the circle?", "hint": "",
         "A": "the first", "B": "the second", "C": "", "D": "", "answer": "A", "category": "shape"},
        {"index": 3, "image": "1", "question": "Is the shape blue?", "hint": "", "A": "yes", "B": "no", "C": "",
         "D": "", "answer": "A", "category": "colour"},
    ]
    path = tmp_path / "TinyShapes.tsv"
    write_tsv(path, rows)
    return path, rows


def test_read_tsv(mcq_tsv):
    path, rows = mcq_tsv
    items = read_tsv(path)
    assert [i.index for i in items] == ["0", "1", "2", "3"]
    assert items[0].options == {"A": "red", "B": "blue"} and items[1].options == {"A": "circle", "B": "square",
                                                                                   "C": "triangle"}
    assert items[0].hint == "Look closely." and items[1].hint is None and items[2].category == "shape"
    assert len(items[2].images) == 2 and items[3].images == [rows[1]["image"]]  # "1" refers to row index 1
    assert items[0].answers == ["A"]


def test_tsv_errors_name_file_row_and_column(tmp_path):
    bad = tmp_path / "bad.tsv"
    write_tsv(bad, [{"index": 0, "image": png_b64("red"), "question": "q"}])
    with pytest.raises(ValueError, match=r"bad.tsv: missing column\(s\) \['answer'\]"):
        read_tsv(bad)
    write_tsv(bad, [{"index": 7, "image": png_b64("red"), "question": "q", "answer": "A"},
                    {"index": 8, "image": png_b64("red"), "question": "", "answer": "B"}])
    with pytest.raises(ValueError, match=r"bad.tsv: row 2 \(index 8\): empty 'question'"):
        read_tsv(bad)


def test_prompts_and_tiling_as_vlmevalkit():
    item = Item(index="0", row=1, question="What is shown?", answers=["A"], images=["x"],
                options={"A": "cat", "B": "dog"}, hint="A photo.")
    assert build_prompt(item, "mcq", "MMBench_DEV_EN") == (
        "<image>\nA photo.\nWhat is shown?\nA. cat\nB. dog" + MCQ_SUFFIX)
    cn = Item(index="1", row=1, question="这是什么？", answers=["A"], images=["x"], options={"A": "猫"})
    assert build_prompt(cn, "mcq", "MMBench_DEV_CN").endswith("\nA. 猫\n请直接回答选项字母。")
    open_q = Item(index="2", row=1, question="How many?", answers=["2"], images=["x", "y"])
    assert build_prompt(open_q, "mcq", None) == (
        "Image-1: <image>\nImage-2: <image>\nHow many?\nAnswer the question directly.")
    short = "\nAnswer the question using a single word or phrase."
    assert build_prompt(open_q, "vqa", "TextVQA_VAL").endswith("How many?" + short)
    assert build_prompt(open_q, "vqa", "MathVista_MINI").endswith("\nHow many?")
    assert build_prompt(open_q, "vqa", "LLaVABench").endswith("How many?\nAnswer this question in detail.")
    assert build_prompt(open_q, "yn", "MME").endswith("How many? Answer the question using a single word or phrase.")
    assert build_prompt(open_q, "ocr", "OCRBench", thinking=True).endswith(short + "\n" + THINKING_INSTRUCTION)
    assert tiling(1, "OCRBench", None) == (24, True) and tiling(1, "ChartQA_TEST", None) == (12, True)
    assert tiling(1, "OCRBench", 6) == (6, True) and tiling(1, "MMBench", None) == (10, True)
    assert tiling(3, "DocVQA_VAL", None) == (18, False) and tiling(5, "MMBench", 24) == (12, False)


def test_eval_cli_end_to_end(mcq_tsv, tmp_path, capsys):
    path, _ = mcq_tsv
    out = tmp_path / "results" / "tiny.json"
    rc = main(["eval", "--checkpoint", str(CKPT), "--data", str(path), "--kind", "mcq", "--max-tiles", "1",
               "--limit", "3", "--max-new-tokens", "3", "--batch-size", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["dataset"] == "TinyShapes" and res["kind"] == "mcq" and res["n"] == 3
    items = res["items"]
    assert [i["index"] for i in items] == ["0", "1", "2"]
    assert items[0]["prompt"] == "<image>\nLook closely.\nWhat colour is the shape?\nA. red\nB. blue" + MCQ_SUFFIX
    assert items[2]["prompt"] == ("Image-1: <image>\nImage-2: <image>\nWhich image has the circle?\nA. the first\n"
                                  "B. the second" + MCQ_SUFFIX)
    # single images: MSAC at max 1 tile -> 2 tiles; two images share 64 tiles but the limit is 1 each, no MSAC
    assert [i["tiles"] for i in items] == [[2], [2], [1, 1]]
    for i in items:
        assert i["correct"] == (i["extracted"] == i["answer"])
    assert res["correct"] == sum(i["correct"] for i in items)
    assert set(res["per_category"]) == {"colour", "shape"}
    assert res["per_category"]["shape"]["n"] == 2
    assert sum(c["correct"] for c in res["per_category"].values()) == res["correct"]
    assert f"TinyShapes (mcq): accuracy {res['accuracy']:.4f}" in capsys.readouterr().out
    # atomic writes leave no temporary file: the results, the per-item log and VLMEvalKit's prediction file
    assert sorted(p.name for p in out.parent.iterdir()) == ["checkpoint_TinyShapes.xlsx", "tiny.json",
                                                            "tiny.predictions.jsonl"]


def test_eval_cli_reports_bad_tsv(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    write_tsv(bad, [{"index": 0, "image": "q", "question": "q"}])
    rc = main(["eval", "--checkpoint", str(CKPT), "--data", str(bad), "--kind", "vqa", "--out",
               str(tmp_path / "r.json")])
    assert rc == 2
    assert "bad.tsv: missing column(s) ['answer']" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
