"""Evaluation that VLMEvalKit can check: each benchmark's metric wired from a tiny TSV, the prediction file it reads
(written and read back with openpyxl / csv), the kind inferred from the dataset name by the CLI, and the LLM judge
hook (by import path, and over HTTP against a local server on 127.0.0.1 started here)."""

from __future__ import annotations

import csv
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from openpyxl import load_workbook

from sail_jax.cli import main
from sail_jax.evaluation.data import read_tsv
from sail_jax.evaluation.datasets import infer_kind
from sail_jax.evaluation.judging import judge_prompt
from sail_jax.evaluation.predictions import write_predictions
from sail_jax.evaluation.runner import EvalSettings, score_records
from sail_jax.rl.judge import make_judge
from tests.test_eval import CKPT, png_b64, write_tsv

TEN = json.dumps(["cat", "cat", "dog", "dog", "dog", "dog", "dog", "dog", "dog", "dog"])

# dataset name, TSV rows (image column added below), predictions, path into the scores, expected value
CASES = [
    ("DocVQA_VAL", [{"index": 1, "question": "q", "answer": "['hello', 'hi']"}], ["helo"], ("overall",), 80.0),
    ("InfoVQA_VAL", [{"index": 1, "question": "q", "answer": "2021"}], ["2020"], ("overall",), 75.0),
    ("ChartQA_TEST", [{"index": 1, "question": "q", "answer": "45%", "category": "human"},
                      {"index": 2, "question": "q", "answer": "12", "category": "aug"}],
     ["0.46", "13"], ("per_category", "human"), 100.0),  # |0.46-0.45|/0.45 = 2.2% <= 5%; 13 vs 12 is 8.3% off
    ("TextVQA_VAL", [{"index": 1, "question": "q", "answer": TEN}], ["Cat"], ("overall",), 60.0),  # 2 of 10 agree
    ("MMBench_DEV_EN", [{"index": 1, "question": "q", "A": "x", "B": "y", "answer": "A"},
                        {"index": 1000001, "question": "q", "A": "y", "B": "x", "answer": "B"},
                        {"index": 2, "question": "q", "A": "x", "B": "y", "answer": "B"}],
     ["A", "A", "B"], ("overall",), 50.0),  # question 1 fails its circular copy, question 2 holds
    ("MMStar", [{"index": 1, "question": "q", "A": "x", "B": "y", "answer": "B", "l2-category": "fine"}],
     ["(B)"], ("per_l2_category", "fine"), 100.0),
    ("AI2D_TEST", [{"index": 1, "question": "q", "A": "x", "B": "y", "answer": "B"}], ["A"], ("overall",), 0.0),
    ("MME", [{"index": 1, "question": "q", "answer": "Yes", "category": "existence", "image_path": "e/1.jpg"},
             {"index": 2, "question": "q", "answer": "No", "category": "existence", "image_path": "e/1.jpg"}],
     ["Yes", "Yes"], ("perception",), 50.0),  # acc 50 + acc+ 0 (the image's second question is wrong)
    ("HallusionBench", [{"index": "a", "question": "q", "answer": "Yes", "set_id": 0, "figure_id": 0,
                         "question_id": 0},
                        {"index": "b", "question": "q", "answer": "No", "set_id": 0, "figure_id": 0,
                         "question_id": 1}], ["yes", "yes"], ("fAcc",), 0.0),
    ("OCRBench", [{"index": 1, "question": "q", "answer": "stop", "category": "Regular Text Recognition"}],
     ["A STOP sign"], ("final_score",), 1),
    ("MMMU_DEV_VAL", [{"index": 1, "question": "q", "A": "x", "B": "y", "answer": "B"}], ["(B)"], ("overall",),
     100.0),
    ("MathVista_MINI", [{"index": 1, "question": "q", "answer": "14", "question_type": "free_form",
                         "answer_type": "integer"}], ["so it is 14"], ("overall",), 100.0),
]


def records_for(items, predictions):
    return {i.index: {"index": i.index, "prompt": "p", "tiles": [], "response": p, "prediction": p, "error": None}
            for i, p in zip(items, predictions)}


@pytest.mark.parametrize("name, rows, predictions, path, expected", CASES, ids=[c[0] for c in CASES])
def test_metric_wiring_per_benchmark(tmp_path, name, rows, predictions, path, expected):
    tsv = tmp_path / f"{name}.tsv"
    write_tsv(tsv, [{**r, "image": "x"} for r in rows])
    items = read_tsv(tsv)
    kind, metric = infer_kind(str(tsv))
    result, pred_rows = score_records(items, records_for(items, predictions), EvalSettings(kind, name, metric=metric))
    assert result["metric"] == metric
    value = result["scores"]
    for key in path:
        value = value[key]
    assert value == pytest.approx(expected)
    assert [r["prediction"] for r in pred_rows] == predictions
    assert all("image" not in r for r in pred_rows) and pred_rows[0]["question"] == "q"


def test_prediction_file_columns_read_back(tmp_path):
    rows = [{"index": "1", "question": "2+2?", "answer": "4", "A": "", "ratio": "0.5", "prediction": "=2+2"},
            {"index": "1000001", "question": "x", "answer": "four", "A": "3", "ratio": "1", "prediction": "4\x01"}]
    write_predictions(tmp_path / "m_D.xlsx", rows)
    sheet = load_workbook(tmp_path / "m_D.xlsx").active
    header, *values = list(sheet.iter_rows(values_only=True))
    assert header == ("index", "question", "answer", "A", "ratio", "prediction")
    # integer columns as numbers (VLMEvalKit keys rows by index), mixed columns as text, a blank cell stays empty,
    # a prediction is always text (never a formula), characters XML cannot hold are dropped
    assert values == [(1, "2+2?", "4", None, 0.5, "=2+2"), (1000001, "x", "four", 3, 1.0, "4")]
    write_predictions(tmp_path / "m_D.tsv", rows)
    with (tmp_path / "m_D.tsv").open(newline="", encoding="utf-8") as f:
        assert list(csv.DictReader(f, delimiter="\t")) == rows
    assert (tmp_path / "m_D.tsv").read_text().startswith('"index"\t"question"')  # quoted, as VLMEvalKit dumps
    with pytest.raises(ValueError, match="prediction files are xlsx or tsv"):
        write_predictions(tmp_path / "m_D.csv", rows)


def test_cli_infers_kind_and_writes_vlmevalkit_file(tmp_path, capsys):
    red, blue = png_b64("red"), png_b64("blue", "square")
    rows = [
        {"index": 0, "image": red, "question": "What colour is the shape?", "hint": "Look closely.", "A": "red",
         "B": "blue", "answer": "A", "category": "colour", "l2-category": "perception"},
        {"index": 1, "image": blue, "question": "Which shape is it?", "hint": "", "A": "circle", "B": "square",
         "answer": "B", "category": "shape", "l2-category": "perception"},
        {"index": 2, "image": json.dumps([red, blue]), "question": "Which image has the circle?", "hint": "",
         "A": "the first", "B": "the second", "answer": "A", "category": "shape", "l2-category": "reasoning"},
    ]
    tsv = tmp_path / "MMStar.tsv"
    write_tsv(tsv, rows)
    out = tmp_path / "res" / "r.json"
    common = ["--checkpoint", str(CKPT), "--data", str(tsv), "--max-tiles", "1", "--max-new-tokens", "3",
              "--batch-size", "2", "--model-name", "Tiny"]
    assert main(["eval", *common, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["kind"], res["metric"]) == ("mcq", "mcq_accuracy")
    assert res["scores"]["overall"] == pytest.approx(100 * res["accuracy"])
    assert set(res["scores"]["per_l2_category"]) == {"perception", "reasoning"}
    assert res["prediction_file"] == str(out.parent / "Tiny_MMStar.xlsx")
    header, *values = list(load_workbook(res["prediction_file"]).active.iter_rows(values_only=True))
    assert header == ("index", "question", "hint", "A", "B", "answer", "category", "l2-category", "prediction")
    assert [v[0] for v in values] == [0, 1, 2] and [v[-1] or "" for v in values] == [
        i["prediction"] for i in res["items"]]
    assert values[0][:8] == (0, "What colour is the shape?", "Look closely.", "red", "blue", "A", "colour",
                             "perception")
    assert "mcq_accuracy: {" in capsys.readouterr().out
    # --kind still overrides (a kind other than the benchmark's scores plain accuracy only); unknown names need it
    assert main(["eval", *common, "--kind", "vqa", "--pred-format", "tsv", "--out", str(tmp_path / "v.json")]) == 0
    res = json.loads((tmp_path / "v.json").read_text())
    assert (res["kind"], res["metric"], res["scores"]) == ("vqa", None, None)
    with (tmp_path / "Tiny_MMStar.tsv").open(newline="", encoding="utf-8") as f:
        assert [r["index"] for r in csv.DictReader(f, delimiter="\t")] == ["0", "1", "2"]
    capsys.readouterr()
    assert main(["eval", *common, "--dataset", "MyBench", "--out", str(tmp_path / "u.json")]) == 2
    assert "dataset 'MyBench' is not a known benchmark: give --kind" in capsys.readouterr().err


def scripted_judge(question: str, response: str, answer: str) -> float:
    """A judge for the import-path test: fails on "boom", else 1 when the response names the answer."""
    if response == "boom":
        raise RuntimeError("judge down")
    return float(answer.lower() in response.lower())


def test_judge_prompts_and_judged_metrics(tmp_path):
    tsv = tmp_path / "MMVet.tsv"
    write_tsv(tsv, [{"index": 0, "image": "x", "question": "Which two?", "answer": "cat<AND>dog", "category": "rec"},
                    {"index": 1, "image": "x", "question": "Text?", "answer": "stop", "category": "ocr,rec"},
                    {"index": 2, "image": "x", "question": "Sum?", "answer": "4", "category": "math"}])
    items = read_tsv(tsv)
    prompt = judge_prompt("mmvet", {**items[0].fields, "prediction": "a {question} cat"})
    assert prompt.startswith("\nCompare the ground truth and prediction from AI models")
    assert prompt.endswith("\nWhich two? | cat <AND> dog | a {question} cat | ")  # filled once, never re-substituted
    judge = make_judge("tests.test_eval_vlmevalkit:scripted_judge")
    settings = EvalSettings("vqa", "MMVet", metric="mmvet")
    with pytest.raises(ValueError, match="mmvet is scored by an LLM judge"):
        score_records(items, records_for(items, ["x", "y", "z"]), settings)
    result, rows = score_records(items, records_for(items, ["cat<AND>dog", "boom", "5"]), settings, judge)
    # scores 1, 0 (failed call), 0: overall 33.3; rec: (1 + 0) / 2; ocr: 0; the failure is the row's error
    assert result["scores"]["overall"] == pytest.approx(100 / 3)
    assert result["scores"]["per_capability"] == {"rec": 50.0, "ocr": 0.0, "math": 0.0}
    assert result["scores"]["per_category"] == {"rec": 100.0, "ocr_rec": 0.0, "math": 0.0}
    assert [i["error"] for i in result["items"]] == [None, f"judge {judge.name} failed; scored 0", None]
    assert [r["error"] for r in rows] == ["", f"judge {judge.name} failed; scored 0", ""]
    assert result["failed"] == 1 and result["judge"] == {"name": judge.name, "calls": 3, "failures": 1}

    mv = tmp_path / "MathVista_MINI.tsv"
    write_tsv(mv, [{"index": i, "image": "x", "question": f"Q{i}", "answer": "14", "question_type": "free_form",
                    "answer_type": "text"} for i in range(2)])
    items = read_tsv(mv)
    judge = make_judge("tests.test_eval_vlmevalkit:scripted_judge")
    result, _ = score_records(items, records_for(items, ["14", "fourteen (14)"]),
                              EvalSettings("vqa", "MathVista_MINI", metric="mathvista"), judge)
    assert result["scores"]["overall"] == 100.0 and judge.calls == 1  # the rule-based hit needs no judge call
    assert judge_prompt("mathvista", {"question": "Q1", "answer": "14", "prediction": "p"}).endswith(
        "Q1\nModel response: p\nGround truth: 14\nExtracted answer:")


class JudgeServer:
    """A judge on 127.0.0.1: replies {"score": 1} when the response contains the answer, else {"score": 0.5}; keeps
    the requests it got."""

    def __init__(self):
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                payload = json.dumps({"score": 1.0 if body["answer"] in body["response"] else 0.5}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/judge"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_cli_judge_over_http(tmp_path, capsys):
    tsv = tmp_path / "MMVet.tsv"
    write_tsv(tsv, [{"index": 0, "image": png_b64("red"), "question": "What colour is the shape?",
                     "answer": "red", "category": "rec"},
                    {"index": 1, "image": png_b64("blue", "square"), "question": "Which shape is it?",
                     "answer": "square", "category": "rec,spat"}])
    common = ["--checkpoint", str(CKPT), "--data", str(tsv), "--max-tiles", "1", "--max-new-tokens", "3",
              "--batch-size", "2", "--out", str(tmp_path / "r.json")]
    assert main(["eval", *common]) == 2
    assert "MMVet (mmvet) is scored by an LLM judge: give --judge" in capsys.readouterr().err
    with JudgeServer() as server:
        assert main(["eval", *common, "--judge", server.url]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert len(server.requests) == 2
    for request, item in zip(server.requests, res["items"]):
        assert request["response"] == item["prediction"] and request["answer"] == item["answer"]
        assert request["question"].startswith("\nCompare the ground truth and prediction from AI models")
    assert "What colour is the shape? | red | " in server.requests[0]["question"]
    scores = [1.0 if r["answer"] in r["response"] else 0.5 for r in server.requests]
    assert res["scores"]["overall"] == pytest.approx(50 * sum(scores))
    assert res["scores"]["per_capability"]["spat"] == pytest.approx(100 * scores[1])
    assert res["judge"] == {"name": server.url, "calls": 2, "failures": 0}
    header, *values = list(load_workbook(res["prediction_file"]).active.iter_rows(values_only=True))
    assert header == ("index", "question", "answer", "category", "prediction", "score")
    assert [v[-1] for v in values] == scores
    assert main(["eval", *common[:-2], "--dataset", "DocVQA_VAL", "--judge", server.url, "--out",
                 str(tmp_path / "d.json")]) == 2
    assert "--judge: dataset 'DocVQA_VAL' has no judge prompt" in capsys.readouterr().err
