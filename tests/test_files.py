"""What the commands write gets the user's umask (sail_jax/files.py), not the 0600/0700 of mkstemp/mkdtemp: answers
and result files, preprocessed inputs, and converted checkpoints (the directory and everything in it)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from converters.convert import atomic_destination
from sail_jax import files
from sail_jax.cli import main
from tests.conftest import DATA


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_current_umask_reads_it_without_changing_it(umask):
    assert files.current_umask() == umask
    assert files.current_umask() == umask and os.umask(umask) == umask


def test_write_text_atomic(tmp_path, umask):
    out = tmp_path / "sub" / "answers.jsonl"
    files.write_text_atomic(out, "a\n")
    files.write_text_atomic(out, "b\n")  # replacing a file keeps the rule too
    assert out.read_text() == "b\n" and mode(out) == 0o666 & ~umask
    assert [p.name for p in out.parent.iterdir()] == ["answers.jsonl"]


def test_converter_destination(tmp_path, umask):
    for overwrite in (False, True):
        with atomic_destination(tmp_path / "ckpt", overwrite=overwrite) as d:
            (d / "params").mkdir()
            (d / "config.json").write_text("{}")
    dst = tmp_path / "ckpt"
    assert mode(dst) == 0o777 & ~umask and mode(dst / "params") == 0o777 & ~umask
    assert mode(dst / "config.json") == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_preprocess_output(tmp_path, umask, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    out = tmp_path / "inputs.npz"
    assert main(["preprocess", "--tokenizer", str(DATA / "tokenizer"), "--image", str(image), "--prompt", "hi",
                 "--max-tiles", "1", "--out", str(out)]) == 0
    assert mode(out) == 0o666 & ~umask and "input_ids" in np.load(out)


def test_converted_checkpoint_tree(tmp_path, umask, capsys):
    """`sail-jax convert` end to end: no file or directory of the checkpoint is more private than the umask asks."""
    dst = tmp_path / "ckpt"
    assert main(["convert", "hf-to-orbax", "--src", str(DATA / "sailvl2-tiny" / "checkpoint"), "--dst", str(dst),
                 "--no-progress"]) == 0
    tree = [dst, *dst.rglob("*")]
    assert len(tree) > 3
    for path in tree:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode(path) == expected, (path, oct(mode(path)))


def test_local_copy_cache_evicts_the_least_recently_used(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAIL_JAX_CACHE", str(cache))
    monkeypatch.setenv("SAIL_JAX_CACHE_MAX_GB", str(2500 / 1e9))  # room for two 1000-byte copies
    src = {}
    for name, size in (("a", 1000), ("b", 1000), ("c", 1000), ("d", 3000)):
        src[name] = tmp_path / name
        src[name].write_bytes(os.urandom(size))
    a, b = files.local_copy(src["a"]), files.local_copy(src["b"])
    os.utime(a.parent, ns=(10**12, 10**12))  # used long ago: a, then b
    os.utime(b.parent, ns=(2 * 10**12, 2 * 10**12))
    assert files.local_copy(src["a"]) == a  # a is now the most recently used
    c = files.local_copy(src["c"])  # 3000 bytes > the cap: b goes
    assert a.read_bytes() == src["a"].read_bytes() and c.read_bytes() == src["c"].read_bytes() and not b.exists()
    d = files.local_copy(src["d"])  # alone over the cap: kept (in use), every other copy goes
    assert d.read_bytes() == src["d"].read_bytes() and sorted(cache.iterdir()) == [d.parent]
    for bad in ("0", "x"):
        monkeypatch.setenv("SAIL_JAX_CACHE_MAX_GB", bad)
        with pytest.raises(ValueError, match=f"SAIL_JAX_CACHE_MAX_GB='{bad}': expected a positive number"):
            files.local_copy(src["a"])
    assert files.local_copy(src["d"]) == d  # a copy already made is still used
