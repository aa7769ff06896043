"""The `make demo` path: held-out QA reading/scoring, the trainer's Grain data factory, and a short end-to-end run
(data -> eval -> train -> eval -> plot -> HF export) of `sail_jax.evaluation.demo.run_demo`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from sail_jax.config import get_preset
from sail_jax.data.batch import check_batch
from sail_jax.data.pipeline import grain_data
from sail_jax.evaluation.demo import evaluate_qa, make_demo_data, read_qa_jsonl
from sail_jax.inference.engine import Completion

TOKENIZER = Path(__file__).parent / "data" / "tokenizer"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_data")
    make_demo_data(out, n=40, seed=1, n_heldout=12)
    return out


def test_read_qa_jsonl_resolves_images_and_names_bad_lines(demo_data, tmp_path):
    rows = read_qa_jsonl(demo_data / "heldout_eval.jsonl")
    assert rows and all(Path(p).is_file() for r in rows for p in r["image"])
    assert {"question", "answer", "type", "line"} <= set(rows[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: invalid JSON"):
        read_qa_jsonl(bad)
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing key\(s\) \['answer'\]"):
        read_qa_jsonl(bad)


class _ScriptedEngine:
    """Answers from a script (by prompt order); stands in for the model to check the scoring around it."""

    def __init__(self, tokenizer, answers: list[str]):
        self.tokenizer, self.answers = tokenizer, list(answers)

    def generate(self, requests, sampling):
        out = []
        for _ in requests:
            ids = self.tokenizer.encode(self.answers.pop(0)) + [self.tokenizer.token_to_id("<|im_end|>")]
            out.append(Completion(token_ids=ids, finish_reason="stop"))
        return out


def test_evaluate_qa_scores_known_predictions(demo_data):
    from sail_jax.data.processor import SailProcessor

    processor = SailProcessor.from_dir(TOKENIZER, max_num=1, image_size=224)
    rows = read_qa_jsonl(demo_data / "heldout_eval.jsonl")[:6]
    # right (with different case / punctuation), wrong, right, ...
    answers = [(str(r["answer"]).upper() + "." if i % 2 == 0 else "zebra") for i, r in enumerate(rows)]
    result = evaluate_qa(_ScriptedEngine(processor.tokenizer, answers), processor, rows, batch_size=4)
    assert result["n"] == 6 and result["correct"] == 3 and result["accuracy"] == pytest.approx(0.5)
    assert [it["correct"] for it in result["items"]] == [True, False] * 3
    assert sum(c["n"] for c in result["per_category"].values()) == 6


def test_grain_data_factory_yields_checked_trainer_batches(demo_data):
    tiny = get_preset("tiny")
    cfg = dataclasses.replace(tiny, vision=dataclasses.replace(tiny.vision, image_size=224))
    it = grain_data(cfg=cfg, global_batch_size=4, seq_len=256, process_index=0, process_count=1, seed=0,
                    datasets=[{"path": str(demo_data / "train.jsonl")}], tokenizer_dir=str(TOKENIZER),
                    max_num=1, max_tiles=2)
    for _ in range(2):
        batch = next(it)
        check_batch(batch, 4, 256, cfg)
        assert batch["pixel_values"].shape == (4, 2, 3, cfg.vision.image_size, cfg.vision.image_size)
        assert batch["tile_mask"].any() and batch["loss_mask"].sum() > 0
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        grain_data(cfg=cfg, global_batch_size=4, seq_len=256, process_index=0, process_count=3, seed=0,
                   datasets=[{"path": str(demo_data / "train.jsonl")}], tokenizer_dir=str(TOKENIZER))


def test_demo_runs_end_to_end(tmp_path):
    from converters.load import load_checkpoint
    from sail_jax.evaluation.demo import run_demo

    results = run_demo(out=tmp_path, n=24, steps=2, seed=0, n_heldout=4)
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["train_steps"] == 2 and np.isfinite(saved["final_loss"])
    n_eval = len(read_qa_jsonl(tmp_path / "data" / "heldout_eval.jsonl"))
    assert saved["n_eval"] == n_eval == len(saved["predictions_after"])
    assert 0 <= results["accuracy_before"] <= 1 and 0 <= results["accuracy_after"] <= 1
    assert (tmp_path / "loss.png").stat().st_size > 0
    # the export is the upstream layout and holds the trained weights
    hf = tmp_path / "hf"
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))
    _, exported = load_checkpoint(hf)
    _, trained = load_checkpoint(Path(results["checkpoint"]))
    flat = lambda t: {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(t)}
    exported, trained = flat(exported), flat(trained)
    assert exported.keys() == trained.keys()
    for key, value in trained.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
