"""The RL prompt JSONL reader: good records, images, and bad lines skipped with counts and file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sail_jax.rl import RLPrompt, read_prompts


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n",
                    encoding="utf-8")
    return path


def test_read_prompts_keeps_good_lines_and_locates_bad_ones(tmp_path):
    path = _write(tmp_path / "rl.jsonl", [
        {"id": "a", "image": "img/1.png", "question": "How many circles?", "answer": 3, "kind": "count"},
        {"id": 7, "question": "1/2 = ?", "answer": "0.5", "kind": "math"},
        "",  # blank lines are not records
        "{not json",
        {"id": "c", "question": "Colour?", "kind": "mcq"},  # no answer
        {"id": "d", "question": "Q", "answer": "A", "kind": "essay"},
        {"id": "e", "image": ["x.png", "y.png"], "question": "图中是什么形状？", "answer": "B", "kind": "mcq"},
        {"id": "f", "image": ["x.png", 3], "question": "Q", "answer": "A", "kind": "open"},
        '["a list"]',
    ])
    result = read_prompts(path)
    assert result.prompts == [
        RLPrompt("a", "How many circles?", "3", "count", (tmp_path / "img/1.png",)),
        RLPrompt("7", "1/2 = ?", "0.5", "math"),
        RLPrompt("e", "图中是什么形状？", "B", "mcq", (tmp_path / "x.png", tmp_path / "y.png")),
    ]
    assert dict(result.skipped) == {"malformed": 4, "unknown_kind": 1}
    assert [line.split(": ")[0] for line in result.bad_lines] == [f"{path}:{n}" for n in (4, 5, 6, 8, 9)]
    assert "missing or invalid 'answer'" in result.bad_lines[1]
    assert "kind 'essay'" in result.bad_lines[2]
    roots = read_prompts(path, image_root=tmp_path / "images").prompts
    assert roots[0].images == (tmp_path / "images/img/1.png",)


def test_read_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_prompts(tmp_path / "missing.jsonl")
    path = _write(tmp_path / "bad.jsonl", ["{oops", {"id": "x"}])
    with pytest.raises(ValueError, match=r"no usable RL prompt \(first problem: .*bad.jsonl:1: not valid JSON"):
        read_prompts(path)
