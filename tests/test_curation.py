"""`sail-jax curate`: each verb on small generated JSONL files with known kept/dropped ids, bad lines located by
file:line, seeded determinism, atomic outputs (nothing written on error) and the command line once per verb."""

from __future__ import annotations

import json
import math
import random

import pytest

from sail_jax.cli import main as cli_main
from sail_jax.curation import cot_clean, dedup, judge_filter, ngram_resample
from sail_jax.curation.text import words


def conv(question: str, answer: str, **extra) -> dict:
    return {**extra, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def write_jsonl(path, lines: list[dict | str]) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def ids(path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_words_normalise_case_punctuation_markers_and_cjk():
    assert words("<image>\nWhat's  the COLOUR?") == ["what", "s", "the", "colour"]
    assert words("图中有3个圆") == ["图", "中", "有", "3", "个", "圆"]


CAPTIONS = [
    conv("Describe.", "a", id="keep", vir=4, ita=3, judge="Yes"),
    conv("Describe.", "b", id="low-vir", vir=2, ita=5, judge="Yes"),
    conv("Describe.", "c", id="refused", vir=5, ita=-1, judge="Yes"),
    conv("Describe.", "d", id="judged-no", vir=5, ita=5, judge=" no "),
    conv("Describe.", "e", id="no-ita", vir=5, judge="Yes"),
    "{not json",
    conv("Describe.", "f", id="text-scores", vir="4", ita=4.0, judge="YES"),
    json.dumps({"id": "no-conversations"}),
]


def test_filter_caption_preset(tmp_path):
    src, out, rep = tmp_path / "c.jsonl", tmp_path / "o.jsonl", tmp_path / "r.json"
    write_jsonl(src, CAPTIONS)
    rules = judge_filter.build_rules("caption", [], [])
    report = judge_filter.filter_file(src, out, rep, rules, max_bad_fraction=0.5)
    assert ids(out) == ["keep", "text-scores"]
    saved = json.loads(rep.read_text())
    assert saved["dropped"] == {"ita missing": 1, "ita refused (-1)": 1, "judge = No": 1, "vir < 3": 1}
    assert (saved["records"], saved["kept"], saved["bad_lines"]) == (6, 2, 2)
    assert [b["where"] for b in saved["bad"]] == [f"{src}:6", f"{src}:8"]
    assert {b["reason"] for b in saved["bad"]} == {"malformed"}
    assert report.as_dict() == saved


def test_filter_video_preset_and_custom_rules(tmp_path):
    src, out, rep = tmp_path / "v.jsonl", tmp_path / "o.jsonl", tmp_path / "r.json"
    write_jsonl(src, [conv("Q?", "A", id="ok", alignment=5, richness=5, difficulty=3),
                      conv("Q?", "A", id="hard-refused", alignment=9, richness=7, difficulty=-1),
                      conv("Q?", "A", id="misaligned", alignment=4, richness=7, difficulty=8),
                      conv("Q?", "A", id="bad-score", alignment="high", richness=7, difficulty=8),
                      conv("Q?", "A", id="nan-score", alignment="nan", richness=7, difficulty=8)])
    report = judge_filter.filter_file(src, out, rep, judge_filter.build_rules("video-qa", [], []))
    assert ids(out) == ["ok"]
    assert report.dropped == {"difficulty refused (-1)": 1, "alignment < 5": 1, "alignment not a number": 2}
    # --min replaces the preset's score rules: only alignment >= 4 is asked for (the refusal still drops).
    judge_filter.filter_file(src, out, rep, judge_filter.build_rules("video-qa", ["alignment=4"], []))
    assert ids(out) == ["ok", "hard-refused", "misaligned"]
    rules = judge_filter.build_rules(None, [], ["alignment=4"])
    judge_filter.filter_file(src, out, rep, rules)
    assert ids(out) == ["ok", "hard-refused", "bad-score", "nan-score"]
    for args, message in [((None, [], []), "no rule"), (("caption", ["vir"], []), "FIELD=VALUE"),
                          (("caption", ["vir=high"], []), "not a number")]:
        with pytest.raises(ValueError, match=message):
            judge_filter.build_rules(*args)


def test_too_many_bad_lines_write_nothing(tmp_path, capsys):
    src, out = tmp_path / "c.jsonl", tmp_path / "o.jsonl"
    write_jsonl(src, CAPTIONS)
    rc = cli_main(["curate", "filter", "--in", str(src), "--out", str(out), "--preset", "caption"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith(f"sail-jax curate: error: {src}: 2 of 8 lines are unusable (first: {src}:6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no output, no report, no temporary file


def test_filter_cli(tmp_path, capsys):
    src, out = tmp_path / "c.jsonl", tmp_path / "o.jsonl"
    write_jsonl(src, CAPTIONS)
    argv = ["curate", "filter", "--in", str(src), "--out", str(out), "--min", "vir=4", "--min", "ita=4",
            "--max-bad-fraction", "0.5"]
    assert cli_main(argv) == 0
    assert "kept 2 of 6 records" in capsys.readouterr().out
    assert ids(out) == ["judged-no", "text-scores"]
    assert json.loads((tmp_path / "o.jsonl.report.json").read_text())["params"] == {"rules": ["vir >= 4",
                                                                                              "ita >= 4"]}
    assert cli_main(["curate", "filter", "--in", str(src), "--out", str(out), "--min", "vir"]) == 2
    assert "--min 'vir': expected FIELD=VALUE" in capsys.readouterr().err


def ngram_lines() -> list[dict]:
    """60 copies of one 3-word caption (one trigram, c = 60), 4 distinct ones (c = 1) and a 2-word caption."""
    lines = [conv("Describe the image.", "A red circle.", id=f"t{i}") for i in range(60)]
    lines[10:10] = [conv("Describe the image.", text, id=f"u{i}") for i, text in
                    enumerate(["one blue square", "two green squares", "a small triangle", "three big circles"])]
    lines.append(conv("Describe the image.", "Blue square.", id="short"))
    return lines


def test_ngram_resample_rule_and_entropy(tmp_path):
    src, out, rep = tmp_path / "n.jsonl", tmp_path / "o.jsonl", tmp_path / "r.json"
    lines = ngram_lines()
    write_jsonl(src, lines)
    report = ngram_resample.resample_file(src, out, rep, max_count=3, n=3, seed=5)
    # The documented rule, recomputed: p_keep = 3/60 for the template, 1 for distinct and short captions.
    rng = random.Random(5)
    expected = [x["id"] for x in lines if rng.random() < (0.05 if x["id"].startswith("t") else 1.0)]
    assert ids(out) == expected
    assert {"u0", "u1", "u2", "u3", "short"} <= set(expected) and len(expected) < 20
    assert report.dropped == {"over-represented n-grams": len(lines) - len(expected)}
    kept_template = sum(i.startswith("t") for i in expected)
    h = lambda counts: -sum(c / sum(counts) * math.log2(c / sum(counts)) for c in counts)
    before, after = report.stats["before"], report.stats["after"]
    assert before["entropy_bits"] == pytest.approx(h([60, 1, 1, 1, 1]), abs=1e-6)
    assert after["entropy_bits"] == pytest.approx(h([kept_template, 1, 1, 1, 1]), abs=1e-6)
    assert after["entropy_bits"] > before["entropy_bits"]
    assert before["top"][0] == ["a red circle", 60] and before["distinct"] == 5
    # Deterministic for a seed; another seed draws differently.
    first = out.read_bytes()
    ngram_resample.resample_file(src, out, rep, max_count=3, n=3, seed=5)
    assert out.read_bytes() == first
    ngram_resample.resample_file(src, out, rep, max_count=3, n=3, seed=6)
    assert out.read_bytes() != first
    # With T at the head count every record is kept; counting the (shared) question turn changes nothing here.
    assert ngram_resample.resample_file(src, out, rep, max_count=60, n=3, turns="all").kept == len(lines)


def test_keep_probability_is_one_minus_product_of_misses():
    counts = {"a": 10, "b": 4, "c": 1}
    assert ngram_resample.keep_probability(["a", "b", "a"], counts, 2) == pytest.approx(1 - 0.8 * 0.5)
    assert ngram_resample.keep_probability(["a", "c"], counts, 2) == 1.0
    assert ngram_resample.keep_probability([], counts, 2) == 1.0


def test_ngram_resample_cli(tmp_path, capsys):
    src, out = tmp_path / "n.jsonl", tmp_path / "o.jsonl"
    write_jsonl(src, ngram_lines())
    argv = ["curate", "ngram-resample", "--in", str(src), "--out", str(out), "--max-count", "60", "--seed", "1"]
    assert cli_main(argv) == 0
    assert "3-gram entropy 0.462 -> 0.462 bits" in capsys.readouterr().out
    assert len(ids(out)) == 65
    assert cli_main([*argv[:-4], "--max-count", "0"]) == 2
    assert "--max-count must be >= 1, got 0" in capsys.readouterr().err


def dedup_files(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    (images / "a.png").write_bytes(b"AAA")
    (images / "b.png").write_bytes(b"AAA")  # same content as a.png under another path
    (images / "c.png").write_bytes(b"CCC")
    q = "<image>\nWhat colour is it?"
    src = tmp_path / "d.jsonl"
    write_jsonl(src, [conv(q, "red", id="d1", image="a.png"),
                      conv("What  COLOUR is it", "red", id="d2-dup", image="b.png"),
                      conv(q, "blue", id="d3", image="c.png"),
                      conv("What colour is it?", "?", id="d4"),
                      conv("what colour, is it!", "?", id="d5-dup"),
                      conv(q, "?", id="d6-missing", image="missing.png"),
                      conv("<image>\nHow many?", "1", id="d7", image="a.png"),
                      conv(q, "x", id="d8", image=["a.png", "c.png"]),
                      conv(q, "y", id="d9-dup", image=["b.png", "c.png"]),
                      conv(q, "z", id="d10", image=["c.png", "a.png"])])
    return src, images


def test_dedup_by_image_bytes_and_question(tmp_path):
    src, images = dedup_files(tmp_path)
    out, rep = tmp_path / "o.jsonl", tmp_path / "r.json"
    report = dedup.dedup_file(src, out, rep, image_root=images, max_bad_fraction=0.2)
    assert ids(out) == ["d1", "d3", "d4", "d7", "d8", "d10"]
    assert report.dropped == {"duplicate": 3}
    assert report.bad == [{"where": f"{src}:6", "reason": "missing_image",
                           "error": f"image {images / 'missing.png'}: No such file or directory"}]
    assert report.stats == {"distinct_keys": 6, "images_hashed": 3}
    assert (report.records, report.bad_lines) == (9, 1)


def test_dedup_cli(tmp_path, capsys):
    src, images = dedup_files(tmp_path)
    out, rep = tmp_path / "o.jsonl", tmp_path / "r.json"
    argv = ["curate", "dedup", "--in", str(src), "--out", str(out), "--report", str(rep), "--image-root", str(images)]
    assert cli_main(argv) == 2  # 1 bad line of 10 is over the default 5%
    assert "1 of 10 lines are unusable" in capsys.readouterr().err and not out.exists()
    assert cli_main([*argv, "--max-bad-fraction", "0.1"]) == 0
    assert ids(out) == ["d1", "d3", "d4", "d7", "d8", "d10"]
    assert json.loads(rep.read_text())["dropped"] == {"duplicate": 3}
    assert cli_main([*argv[:-1], str(tmp_path / "nowhere")]) == 2
    assert "--image-root" in capsys.readouterr().err


COT = [
    {"id": "k1", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What is 6*7? Answer directly."},
        {"from": "gpt", "value": "<thinking>6 times 7 is 42.</thinking>\nFinal answer: 42"}]},
    conv("How many shapes? No explanation.", "Let me count them one by one.\nThere are three.\nThe final answer is 3.",
         id="k2"),
    conv("What is 6*7?", "<think>42</think> The answer is \\boxed{42}.", id="redundant"),
    conv("What is 6*7?", "42", id="no-thought"),
    conv("What is it?", "<think>A small furry animal.</think>\nIt is a cat.\nIt sits on a mat.", id="no-answer"),
    conv("Answer the question using a single word or phrase.\n<image>\nWhat is shown?",
         "<reasoning>I see a cat on a mat</reasoning><answer>cat</answer>", id="k6", image="x.png"),
    conv("Sum?", "Add three and four.\nSo the result is \\boxed{7}", id="k7"),
    "[1, 2]",
]
COT_EXPECTED = {
    "k1": ("What is 6*7?", "<think>\n6 times 7 is 42.\n</think>\n\\boxed{42}"),
    "k2": ("How many shapes?", "<think>\nLet me count them one by one.\nThere are three.\n</think>\n\\boxed{3}"),
    "k6": ("<image>\nWhat is shown?", "<think>\nI see a cat on a mat\n</think>\n\\boxed{cat}"),
    "k7": ("Sum?", "<think>\nAdd three and four.\n</think>\nSo the result is \\boxed{7}"),
}


def test_cot_clean_formats_and_drops(tmp_path):
    src, out, rep = tmp_path / "c.jsonl", tmp_path / "o.jsonl", tmp_path / "r.json"
    write_jsonl(src, COT)
    report = cot_clean.clean_file(src, out, rep, max_share=1.0, max_bad_fraction=0.2)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert {x["id"]: tuple(t["value"] for t in x["conversations"]) for x in kept} == COT_EXPECTED
    assert kept[2]["image"] == "x.png"
    assert report.dropped == {"no final answer": 1, "no thought": 1, "redundant thought": 1}
    assert report.bad == [{"where": f"{src}:8", "reason": "malformed", "error": "expected a JSON object, got list"}]
    assert report.stats["system_prompts_removed"] == 1 and report.stats["hints_removed"] == 3
    assert cot_clean.overlap("6 times 7 is 42.", "\\boxed{42}") == pytest.approx(1 / 5)
    # A stricter threshold also drops k1 (overlap 1/5: "42") and k6 (1/7: "cat"); k2 and k7 share no word.
    cot_clean.clean_file(src, out, rep, max_overlap=0.1, max_share=1.0, max_bad_fraction=0.2)
    assert ids(out) == ["k2", "k7"]


def test_cot_length_balance(tmp_path):
    thoughts = ["one two"] * 6 + ["one two three four five"] * 2 + ["w " * 9] * 2  # buckets 0, 1, 2 of 4 words
    lines = [conv("Q?", f"<think>{t}</think>\\boxed{{x}}", id=f"b{i}") for i, t in enumerate(thoughts)]
    assert cot_clean.bucket_cap({0: 6, 1: 2, 2: 2}, 0.4) == 2  # cap 3 would give bucket 0 a share of 3/7
    src, out, rep = tmp_path / "c.jsonl", tmp_path / "o.jsonl", tmp_path / "r.json"
    write_jsonl(src, lines)
    report = cot_clean.clean_file(src, out, rep, bucket_words=4, max_share=0.4, seed=3)
    rng = random.Random(3)
    expected = [x["id"] for i, x in enumerate(lines) if rng.random() < (2 / 6 if i < 6 else 1.0)]
    assert ids(out) == expected and expected[-4:] == ["b6", "b7", "b8", "b9"] and len(expected) < 10
    assert report.stats["bucket_cap"] == 2
    assert report.stats["thought_words_buckets_before"] == {"0-3": 6, "4-7": 2, "8-11": 2}
    assert report.dropped == {"length bucket over cap": 10 - len(expected)}
    with pytest.raises(ValueError, match=r"--max-bucket-share 0.3 is below 1/3"):
        cot_clean.clean_file(src, tmp_path / "o2.jsonl", tmp_path / "r2.json", bucket_words=4, max_share=0.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "o.jsonl", "r.json"]  # nothing half-written


def test_cot_clean_cli(tmp_path, capsys):
    src, out = tmp_path / "c.jsonl", tmp_path / "o.jsonl"
    write_jsonl(src, COT)
    argv = ["curate", "cot-clean", "--in", str(src), "--out", str(out), "--max-bucket-share", "1",
            "--max-bad-fraction", "0.2", "--seed", "4"]
    assert cli_main(argv) == 0
    assert ids(out) == ["k1", "k2", "k6", "k7"]
    assert "kept 4 of 7 records" in capsys.readouterr().out
    assert cli_main([*argv, "--max-overlap", "2"]) == 2
    assert "--max-overlap must be in [0, 1], got 2.0" in capsys.readouterr().err
