"""Record sources: JSONL line index with line numbers, pickling into workers, record parsing, and the
`sail-jax jsonl-to-arrayrecord` round trip (same records, same samples)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from sail_jax.cli import main as cli_main
from sail_jax.data.sources import ArrayRecordSource, BadSample, JsonlSource, open_source, parse_record
from sail_jax.data.transforms import SampleTransform

LINES = [
    {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    {"id": "b", "image": "x.png", "conversations": [{"from": "system", "value": "Be brief."},
                                                    {"from": "human", "value": "<image>\nWhat?"},
                                                    {"from": "gpt", "value": "A dot."}]},
    {"id": "c", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    text = json.dumps(LINES[0]) + "\n\n" + json.dumps(LINES[1]) + "\n   \n" + json.dumps(LINES[2])  # no final \n
    path.write_text(text)
    return path


def test_jsonl_source_skips_blank_lines_and_keeps_line_numbers(jsonl):
    src = JsonlSource(jsonl)
    assert len(src) == 3
    assert [src[i].where for i in range(3)] == [f"{jsonl}:1", f"{jsonl}:3", f"{jsonl}:5"]
    assert [json.loads(src[i].data) for i in range(3)] == LINES
    clone = pickle.loads(pickle.dumps(src))  # as sent to a worker process: reopens the file lazily
    assert clone[2] == src[2]


def test_open_source_errors(tmp_path, jsonl):
    with pytest.raises(ValueError, match=r"unknown data file type '\.txt'"):
        open_source(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        open_source(tmp_path / "missing.jsonl")
    assert isinstance(open_source(jsonl), JsonlSource)


def test_parse_record_roles_and_paths(tmp_path):
    conv = parse_record(json.dumps(LINES[1]).encode(), tmp_path)
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    assert conv.images == [tmp_path / "x.png"] and conv.id == "b"
    late_system = {"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"},
                                     {"from": "gpt", "value": "a"}]}
    with pytest.raises(BadSample, match="system message may only come first"):
        parse_record(json.dumps(late_system).encode(), tmp_path)
    with pytest.raises(BadSample, match="'image' must be a path"):
        parse_record(json.dumps({**LINES[0], "image": 3}).encode(), tmp_path)


def test_jsonl_to_arrayrecord_round_trip(jsonl, tmp_path, data_dir, capsys):
    dst = tmp_path / "out" / "d.arrayrecord"
    assert cli_main(["jsonl-to-arrayrecord", "--src", str(jsonl), "--dst", str(dst)]) == 0
    assert "3 records" in capsys.readouterr().out
    src, ar = JsonlSource(jsonl), open_source(dst)
    assert isinstance(ar, ArrayRecordSource) and len(ar) == 3
    assert [ar[i].data for i in range(3)] == [src[i].data.rstrip(b"\n") for i in range(3)]
    assert ar[1].where == f"{dst}:record 2"
    t = SampleTransform(tokenizer_dir=str(data_dir / "tokenizer"), image_root=str(tmp_path), dataset=0,
                        seq_len=512, max_tiles=4, image_size=56)
    np.testing.assert_array_equal(t.map(ar[2])["input_ids"], t.map(src[2])["input_ids"])
