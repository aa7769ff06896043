"""One bad row does not end a run: `sail-jax eval` resumes from its per-item log, records a failed row's error, writes
everything and exits 1; batch `generate` follows the same rule; `--max-new-tokens 0` is refused."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
from openpyxl import load_workbook

from sail_jax.cli import main
from sail_jax.cli._common import load_engine
from sail_jax.evaluation.runner import generate_each
from sail_jax.inference.engine import Completion, Request
from sail_jax.inference.sampling import SamplingParams
from tests.test_eval import CKPT, png_b64, write_tsv


def shapes_tsv(path, bad_row: bool = False):
    rows = [{"index": 0, "image": png_b64("red"), "question": "What colour is the shape?", "answer": "red"},
            {"index": 1, "image": "not-base64!" if bad_row else png_b64("blue"), "question": "And this one?",
             "answer": "blue"},
            {"index": 2, "image": png_b64("green", "square"), "question": "Which shape is it?", "answer": "square"}]
    write_tsv(path, rows)
    return path


def eval_args(tsv, out, *extra):
    return ["eval", "--checkpoint", str(CKPT), "--data", str(tsv), "--kind", "vqa", "--max-tiles", "1",
            "--max-new-tokens", "3", "--batch-size", "2", "--out", str(out), *extra]


def test_rerun_resumes_from_the_partial_log(tmp_path, caplog, capsys):
    tsv, out = shapes_tsv(tmp_path / "Shapes.tsv"), tmp_path / "r.json"
    assert main(eval_args(tsv, out)) == 0
    log = tmp_path / "r.predictions.jsonl"
    header, first, second, third = log.read_text().splitlines()
    assert json.loads(header)["max_new_tokens"] == 3 and [json.loads(x)["index"] for x in (first, second)] == ["0",
                                                                                                                "1"]
    marked = {**json.loads(first), "prediction": "from the log"}  # only a skipped item keeps this
    log.write_text(f"{header}\n{json.dumps(marked)}\n{second[:12]}")  # killed while appending item 1
    with caplog.at_level(logging.WARNING):
        assert main(eval_args(tsv, out)) == 0
    assert "r.predictions.jsonl: dropping the unfinished last line" in caplog.text
    res = json.loads(out.read_text())
    assert [i["prediction"] for i in res["items"]][0] == "from the log"
    lines = log.read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines[1:]] == ["0", "1", "2"]  # only items 1 and 2 were generated again
    assert json.loads(lines[2]) == json.loads(second) and json.loads(lines[3]) == json.loads(third)
    capsys.readouterr()
    assert main(eval_args(tsv, out, "--max-new-tokens", "4")) == 2
    assert "r.predictions.jsonl: written by a run with other settings (differs in ['max_new_tokens'])" in (
        capsys.readouterr().err)


def test_bad_row_is_recorded_and_the_run_goes_on(tmp_path, capsys):
    tsv, out = shapes_tsv(tmp_path / "Shapes.tsv", bad_row=True), tmp_path / "r.json"
    assert main(eval_args(tsv, out, "--model-name", "M")) == 1
    err = capsys.readouterr().err
    assert f"sail-jax eval: {tsv}: row 2 (index 1): column 'image', image 0: not decodable" in err
    assert "1 of 3 rows failed" in err
    res = json.loads(out.read_text())
    assert res["failed"] == 1 and [i["error"] is None for i in res["items"]] == [True, False, True]
    assert res["items"][1]["prediction"] == "" and not res["items"][1]["correct"]
    assert all(i["response"] is not None for i in (res["items"][0], res["items"][2]))
    header, *values = list(load_workbook(tmp_path / "M_Shapes.xlsx").active.iter_rows(values_only=True))
    assert header == ("index", "question", "answer", "prediction", "error")
    assert [v[0] for v in values] == [0, 1, 2] and values[0][-1] is None and "not decodable" in values[1][-1]
    # records are appended as they finish (the bad row at once); a rerun retries the failed row only (it fails again)
    assert main(eval_args(tsv, out, "--model-name", "M")) == 1
    records = [json.loads(x) for x in (tmp_path / "r.predictions.jsonl").read_text().splitlines()[1:]]
    assert [r["index"] for r in records] == ["1", "0", "2", "1"]


def test_max_new_tokens_zero_and_duplicate_indices_are_refused(tmp_path, capsys):
    tsv = shapes_tsv(tmp_path / "Shapes.tsv")
    assert main(eval_args(tsv, tmp_path / "r.json", "--max-new-tokens", "0")) == 2
    assert "max new tokens must be >= 1, got 0" in capsys.readouterr().err
    write_tsv(tmp_path / "Dup.tsv", [{"index": 7, "image": png_b64("red"), "question": "q", "answer": "a"}] * 2)
    assert main(eval_args(tmp_path / "Dup.tsv", tmp_path / "r.json")) == 2
    assert "Dup.tsv: rows 1 and 2 share index '7'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dup.tsv", "Shapes.tsv"]  # nothing written


def test_batch_generation_isolates_a_failing_request(tmp_path, capsys):
    engine, processor = load_engine(argparse.Namespace(checkpoint=str(CKPT), tokenizer=None, dtype="float32",
                                                       tensor_parallel=1, decode_steps=8))
    good = Request(np.asarray(processor.tokenizer.encode("Hello there"), np.int32))
    bad = Request(good.input_ids, pixel_values=np.zeros((1, 3, 448, 448), np.float32))  # tiles without a placeholder
    sampling = SamplingParams(max_new_tokens=3)
    ok, failed = generate_each(engine, [good, bad], sampling)
    assert isinstance(ok, Completion) and ok.token_ids == engine.generate([good], sampling)[0].token_ids
    assert isinstance(failed, ValueError) and "0 <IMG_CONTEXT> tokens but" in str(failed)

    reqs = tmp_path / "requests.jsonl"
    reqs.write_text(json.dumps({"id": "a", "prompt": "Hi", "images": ["missing.png"]}) + "\n"
                    + json.dumps({"id": "b", "prompt": "Hello there"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(CKPT), "--batch", str(reqs), "--out", str(answers),
                 "--max-new-tokens", "3"]) == 1
    a, b = [json.loads(x) for x in answers.read_text().splitlines()]
    assert a["id"] == "a" and "missing.png" in a["error"] and set(a) == {"id", "error"}
    assert b["id"] == "b" and set(b) == {"id", "text", "token_ids"} and 0 < len(b["token_ids"]) <= 3
    err = capsys.readouterr().err
    assert "requests.jsonl line 1: " in err and "1 of 2 requests failed" in err
