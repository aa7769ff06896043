"""Model soup on the upstream tiny fixture and perturbed copies of it, in both formats: the soup is the float32
weighted mean cast back to the stored bfloat16, A souped with itself is A bit for bit, heterogeneous sets and bad
weights are refused in one line with nothing written, and a greedy soup scores candidates with the eval runner."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters.convert import hf_to_orbax
from converters.hf_writer import TensorSpec, write_safetensors_dir
from converters.orbax_io import ParamsReader, load_model_config, restore_params, stored_arrays
from converters.soup import weighted_mean
from sail_jax.cli import main
from sail_jax.cli.soup import format_table, greedy_select
from tests.conftest import DATA
from tests.convert_helpers import assert_same_tensors, read_safetensors_dir
from tests.test_eval import png_b64, write_tsv

CKPT = DATA / "sailvl2-tiny" / "checkpoint"


def upstream_copy(dst, tensors: dict[str, np.ndarray], config_change=None):
    """An upstream directory holding `tensors`, with the fixture's config (edited by `config_change`) and its
    tokenizer files."""
    dst.mkdir(parents=True)
    for f in CKPT.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    if config_change is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config_change(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    write_safetensors_dir(dst, [TensorSpec(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__)
    return dst


@pytest.fixture(scope="module")
def fixture_tensors():
    return read_safetensors_dir(CKPT)[0]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, fixture_tensors):
    """The fixture (A) and two perturbations of it (B, C), all bfloat16."""
    root = tmp_path_factory.mktemp("upstream")
    rng = np.random.default_rng(0)
    dirs = [CKPT]
    for name in ("b", "c"):
        noisy = {k: (v.astype(np.float32) + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
                 for k, v in fixture_tensors.items()}
        dirs.append(upstream_copy(root / name, noisy))
    return dirs


@pytest.fixture(scope="module")
def ours(tmp_path_factory, upstream):
    root = tmp_path_factory.mktemp("ours")
    for i, d in enumerate(upstream):
        hf_to_orbax(d, root / f"o{i}", progress=False)
    return [root / f"o{i}" for i in range(len(upstream))]


def read_ours(d) -> dict[str, np.ndarray]:
    reader = ParamsReader(d)
    return {"/".join(p): reader.read(p) for p in stored_arrays(d)}


def read_any(d) -> dict[str, np.ndarray]:
    return read_ours(d) if (d / "params").is_dir() else read_safetensors_dir(d)[0]


def expected_soup(inputs: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    w = np.asarray(weights, np.float64) / sum(weights)
    out = {}
    for k in inputs[0]:
        acc = inputs[0][k].astype(np.float32) * np.float32(w[0])
        for x, wi in zip(inputs[1:], w[1:]):
            acc = acc + x[k].astype(np.float32) * np.float32(wi)
        out[k] = acc.astype(inputs[0][k].dtype)
    return out


def soup(*args: str) -> int:
    return main(["soup", "--no-progress", *map(str, args)])


def left_over(parent, out) -> list[str]:
    """What a refused soup left in the destination's parent: the destination or a temporary beside it."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((out.name, f".{out.name}")))


@pytest.mark.parametrize("fmt", ["upstream", "ours"])
def test_soup_is_float32_weighted_mean_cast_back(fmt, request, tmp_path, capsys):
    dirs = request.getfixturevalue(fmt)
    out = tmp_path / "soup"
    assert soup(*[a for d in dirs for a in ("--checkpoint", d)], "--weights", "0.5,0.3,0.2", "--out", out) == 0
    assert "note:" not in capsys.readouterr().out  # the weights already sum to 1
    inputs = [read_any(d) for d in dirs]
    assert {x.dtype.name for x in inputs[0].values()} == {"bfloat16"}
    got, want = read_any(out), expected_soup(inputs, [0.5, 0.3, 0.2])
    assert_same_tensors(got, want)
    assert not all(np.array_equal(got[k], inputs[0][k]) for k in got)  # the average moved something
    if fmt == "upstream":
        assert (out / "config.json").read_bytes() == (CKPT / "config.json").read_bytes()
        for name in ("tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                     "preprocessor_config.json", "generation_config.json"):
            assert (out / name).read_bytes() == (CKPT / name).read_bytes(), name
    else:
        assert load_model_config(out) == load_model_config(dirs[0])
        restored = restore_params(out)  # plain Orbax reads what the soup streamed
        assert np.array_equal(np.asarray(restored["language_model"]["embed_tokens"]["embedding"]),
                              got["language_model/embed_tokens/embedding"])


@pytest.mark.parametrize("fmt", ["upstream", "ours"])
def test_soup_of_a_with_itself_is_a(fmt, request, tmp_path):
    a = request.getfixturevalue(fmt)[1]
    out = tmp_path / "soup"
    assert soup("--checkpoint", a, "--checkpoint", a, "--out", out) == 0
    assert_same_tensors(read_any(out), read_any(a))


def _drop_key(t):
    t.pop("mlp1.1.bias")


def _reshape(t):
    t["mlp1.1.bias"] = t["mlp1.1.bias"][:-1]


def _retype(t):
    t["mlp1.1.bias"] = t["mlp1.1.bias"].astype(np.float32)


def _more_layers(cfg):
    cfg["llm_config"]["num_hidden_layers"] = 3


@pytest.mark.parametrize("tensor_change, config_change, message", [
    (None, _more_layers, r"architecture config differs: llm\.num_layers: 2 \(\S+\) vs 3 \(\S+\)"),
    (_drop_key, None, r"bad: missing key 'mlp1\.1\.bias' \(present in \S+\)"),
    (_reshape, None, r"key 'mlp1\.1\.bias': shape \[32\] \(\S+\) vs \[31\] \(\S+\)"),
    (_retype, None, r"key 'mlp1\.1\.bias': dtype bfloat16 \(\S+\) vs float32 \(\S+\)"),
])
def test_heterogeneous_upstream_refused(tmp_path, capsys, fixture_tensors, tensor_change, config_change, message):
    tensors = dict(fixture_tensors)
    if tensor_change is not None:
        tensor_change(tensors)
    bad = upstream_copy(tmp_path / "bad", tensors, config_change)
    out = tmp_path / "soup"
    assert soup("--checkpoint", CKPT, "--checkpoint", bad, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sail-jax soup: error: ")
    assert re.search(message, err), err
    assert left_over(tmp_path, out) == []


def test_heterogeneous_ours_and_mixed_formats_refused(tmp_path, capsys, ours):
    scanned = tmp_path / "scanned"
    hf_to_orbax(ours[0], scanned, scan_layers=True, progress=False)
    out = tmp_path / "soup"
    assert soup("--checkpoint", ours[0], "--checkpoint", scanned, "--out", out) == 2
    assert "architecture config differs: runtime.scan_layers: False" in capsys.readouterr().err
    assert soup("--checkpoint", ours[0], "--checkpoint", CKPT, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"mixed formats: {ours[0]}: sail-jax checkpoint (params/ + model_config/); {CKPT}: upstream directory" in err
    assert left_over(tmp_path, out) == []


def test_weights_validated_and_normalised(tmp_path, capsys, upstream):
    a, b, _ = upstream
    out = tmp_path / "soup"
    ab = ["--checkpoint", a, "--checkpoint", b]
    for weights, message in (("0.5", "1 weights for 2 checkpoints"), ("1,-1", "weights must be positive, got -1.0"),
                             ("1,0", "weights must be positive, got 0.0"), ("1,x", "expected comma-separated numbers")):
        assert soup(*ab, "--weights", weights, "--out", out) == 2
        assert message in capsys.readouterr().err
    assert soup("--checkpoint", a, "--out", out) == 2
    assert "at least 2 checkpoints" in capsys.readouterr().err
    assert soup("--checkpoint", a, "--checkpoint", b, "--out", b, "--overwrite") == 2
    assert "is one of the input checkpoints" in capsys.readouterr().err
    assert left_over(tmp_path, out) == []

    assert soup(*ab, "--weights", "2,1", "--out", out) == 0
    assert "note: weights sum to 3; normalised to 0.6667,0.3333" in capsys.readouterr().out
    assert_same_tensors(read_any(out), expected_soup([read_any(a), read_any(b)], [2 / 3, 1 / 3]))

    assert soup(*ab, "--out", out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    assert soup(*ab, "--out", tmp_path / "notes", "--overwrite") == 2
    assert "is not a checkpoint (no config.json or params/); not replacing it" in capsys.readouterr().err
    assert soup(*ab, "--out", out, "--overwrite") == 0  # an existing soup may be replaced
    assert_same_tensors(read_any(out), expected_soup([read_any(a), read_any(b)], [1, 1]))


def test_weighted_mean_by_row_blocks():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((7, 5)).astype("bfloat16") for _ in range(3)]
    want = expected_soup([{"x": x} for x in xs], [0.2, 0.3, 0.5])["x"]
    for rows_per_read in (None, 1, 3, 7):
        got = weighted_mean(lambda i, rows: xs[i][rows], [0.2, 0.3, 0.5], (7, 5), rows_per_read)
        assert got.dtype == np.float32 and got.astype("bfloat16").tobytes() == want.tobytes()
    scalars = [np.asarray(v, np.float32) for v in (1.0, 2.0)]
    assert weighted_mean(lambda i, rows: scalars[i], [0.25, 0.75], ()) == np.float32(1.75)


def test_greedy_select_keeps_candidates_that_do_not_lower_the_score():
    scores = {("a",): 0.5, ("b",): 0.7, ("c",): 0.6, ("d",): 0.1,
              ("b", "c"): 0.7, ("b", "c", "a"): 0.65, ("b", "c", "d"): 0.8}
    soup_, rows = greedy_select(["a", "b", "c", "d"], lambda s: scores[tuple(s)])
    assert soup_ == ["b", "c", "d"]
    assert rows == [("b", 0.7, 0.7, True), ("c", 0.6, 0.7, True), ("a", 0.5, 0.65, False), ("d", 0.1, 0.8, True)]
    assert format_table(rows).splitlines()[3] == "a           0.5000   0.6500  no"


def test_greedy_soup_end_to_end(tmp_path, capsys, upstream):
    red, blue = png_b64("red", size=(56, 56)), png_b64("blue", "square", size=(56, 56))
    tsv = tmp_path / "Held.tsv"
    write_tsv(tsv, [
        {"index": 0, "image": red, "question": "What colour?", "A": "red", "B": "blue", "answer": "A"},
        {"index": 1, "image": blue, "question": "Which shape?", "A": "circle", "B": "square", "answer": "B"},
        {"index": 2, "image": red, "question": "Is it blue?", "A": "yes", "B": "no", "answer": "B"},
    ])
    out = tmp_path / "soup"
    args = [a for d in upstream for a in ("--checkpoint", d)]
    assert soup(*args, "--greedy", "--eval-data", tsv, "--kind", "mcq", "--max-tiles", "1", "--max-new-tokens", "2",
                "--batch-size", "3", "--out", out) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("candidate"))
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert sorted(r[0] for r in rows) == sorted(map(str, upstream))
    alone = [float(r[1]) for r in rows]
    assert alone == sorted(alone, reverse=True)
    best, kept = float(rows[0][2]), [rows[0][0]]
    for name, _, score, keep in rows[1:]:
        assert (keep == "yes") == (float(score) >= best)
        if keep == "yes":
            best, kept = float(score), [*kept, name]
    assert lines[-1] == f"wrote {out}: greedy soup of {len(kept)} of 3 checkpoints"
    want = expected_soup([read_any(Path(k)) for k in kept], [1] * len(kept))
    assert_same_tensors(read_any(out), want)
    assert left_over(tmp_path, out) == ["soup"]  # the trial soups are gone
