"""Model soup: the weighted average of homogeneous checkpoints, written in the format they share.

Inputs are either all our checkpoints (`params/` + `model_config/`) or all upstream directories (config.json +
safetensors), local or on an object store (ours are read in place, an upstream one from its local copy:
`hf_checkpoint.local_upstream_dir`); the destination may be a URL too (`convert.atomic_destination`). Everything
that could make the average meaningless (formats, architecture config, keys, shapes, dtypes, weights, the
destination) is checked from metadata before any tensor is read, so a refused soup leaves nothing behind.

Memory does not grow with the number of inputs: each unit (an upstream tensor, or one slice of a stacked array of
ours, which is one upstream tensor) is averaged on its own into a float32 accumulator, reading the inputs one after
another (an upstream tensor whole, as the safetensors reader reads; our arrays CHUNK_BYTES of rows at a time), and
the writers cast the accumulator back to the stored dtype block by block. Peak is the accumulator plus one input
copy (2x + 1x a bfloat16 tensor) and the writers' buffers; `benchmarks/soup.py` measures it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from converters.convert import WEIGHT_SUFFIXES, atomic_destination
from converters.core import FLOAT_DTYPES, ConversionError, make_plan
from converters.hf_checkpoint import INDEX_NAME, SafetensorsCheckpoint, local_upstream_dir
from converters.hf_config import from_hf_config
from converters.hf_writer import TensorSpec, write_safetensors_dir
from converters.mapping import model_entries
from converters.model_config import config_dict_differences, model_config_from_dict, model_config_to_dict
from converters.orbax_io import (
    CHUNK_BYTES,
    PARAMS,
    ParamsReader,
    ParamsWriter,
    is_our_checkpoint,
    read_model_config_dict,
    save_model_config,
    stored_arrays,
    unflatten,
    write_step_metadata,
)
from sail_jax.files import as_path, is_url

OURS = "sail-jax checkpoint (params/ + model_config/)"
UPSTREAM = "upstream directory (config.json + safetensors)"
# Files of an input that the soup writes itself rather than copies.
_REWRITTEN = (INDEX_NAME, "_CHECKPOINT_METADATA")
_BLOCK = 4 * 2**20  # elements per accumulation step: bounds the float32 temporary of `acc += w * x`


@dataclasses.dataclass(frozen=True)
class Ingredient:
    """One input checkpoint, described from metadata only."""

    path: Path  # where it is read: ours in place (a URL stays one), an upstream directory on a URL from its copy
    where: str  # the input as given, for messages
    format: str
    config: dict  # the architecture config as stored (ours) or as read from config.json (upstream)
    arrays: dict[str, tuple[tuple[int, ...], np.dtype]]  # key -> (shape, dtype)


def open_ingredient(path: str | os.PathLike) -> Ingredient:
    d = as_path(path) if is_url(path) else Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such checkpoint directory")
    if is_our_checkpoint(d):
        arrays = {"/".join(p): (tuple(a.shape), np.dtype(a.dtype)) for p, a in stored_arrays(d).items()}
        return Ingredient(d, str(d), OURS, read_model_config_dict(d), arrays)
    if not (d / "config.json").exists():
        raise ConversionError(f"{d}: neither a sail-jax checkpoint (params/ + model_config/) nor has config.json")
    local = local_upstream_dir(d)
    config = json.loads(json.dumps(model_config_to_dict(from_hf_config(local))))
    with SafetensorsCheckpoint(local) as st:
        arrays = {k: (st.shape(k), st.dtype(k)) for k in st.keys()}
    return Ingredient(local, str(d), UPSTREAM, config, arrays)


def normalize_weights(weights: Sequence[float] | None, n: int) -> tuple[list[float], str | None]:
    """Weights summing to 1 (uniform by default), and a note when the given ones had to be rescaled."""
    if weights is None:
        return [1.0 / n] * n, None
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} checkpoints")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"weights must be positive, got {bad[0]}")
    total = math.fsum(weights)
    out = [w / total for w in weights]
    if abs(total - 1) <= 1e-9:
        return out, None
    return out, f"weights sum to {total:g}; normalised to {','.join(f'{w:.4g}' for w in out)}"


def _first_differences(a: Ingredient, b: Ingredient) -> str | None:
    """The first way in which `b` cannot be averaged with `a`, in one line; None if they are homogeneous."""
    if a.format != b.format:
        return f"mixed formats: {a.where}: {a.format}; {b.where}: {b.format}"
    diffs = config_dict_differences(a.config, b.config, (a.where, b.where))
    if diffs:
        return f"architecture config differs: {'; '.join(diffs[:3])}" + (
            f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else "")
    missing, extra = sorted(set(a.arrays) - set(b.arrays)), sorted(set(b.arrays) - set(a.arrays))
    if missing:
        return f"{b.where}: missing key {missing[0]!r} (present in {a.where})" + (
            f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if extra:
        return f"{b.where}: extra key {extra[0]!r} (absent from {a.where})" + (
            f" and {len(extra) - 1} more" if len(extra) > 1 else "")
    for k, (shape, dtype) in a.arrays.items():
        other_shape, other_dtype = b.arrays[k]
        if shape != other_shape:
            return f"key {k!r}: shape {list(shape)} ({a.where}) vs {list(other_shape)} ({b.where})"
        if dtype != other_dtype:
            return f"key {k!r}: dtype {dtype.name} ({a.where}) vs {other_dtype.name} ({b.where})"
    return None


def check_homogeneous(ingredients: Sequence[Ingredient]) -> None:
    """Raise ValueError naming the first difference (format, config field, key, shape, dtype) of any input from
    the first, or a tensor that cannot be averaged."""
    first = ingredients[0]
    for other in ingredients[1:]:
        diff = _first_differences(first, other)
        if diff:
            raise ConversionError(diff)
    for k, (_, dtype) in first.arrays.items():
        if dtype.name not in FLOAT_DTYPES:
            raise ConversionError(f"{first.where}: key {k!r} has dtype {dtype.name}; only {FLOAT_DTYPES} are averaged")


def check_destination(out: str | Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """An existing destination is replaced only with `overwrite`, and only if it looks like a checkpoint; it may
    not be one of the inputs."""
    if is_url(out):
        out = as_path(out)
        same = lambda p: is_url(p) and os.fspath(as_path(p)).rstrip("/") == os.fspath(out).rstrip("/")
    else:
        out = Path(out).absolute()
        same = lambda p: not is_url(p) and out.resolve() == Path(p).resolve()
    if any(same(p) for p in inputs):
        raise ValueError(f"--out {out} is one of the input checkpoints")
    if not out.exists():
        return
    if not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    if not ((out / "config.json").exists() or (out / PARAMS).is_dir()):
        raise ValueError(f"{out} exists and is not a checkpoint (no config.json or {PARAMS}/); not replacing it")


def weighted_mean(
    read: Callable[[int, slice], np.ndarray], weights: Sequence[float], shape: tuple[int, ...],
    rows_per_read: int | None = None,
) -> np.ndarray:
    """sum_i float32(w_i) * float32(x_i) for a tensor of `shape`, accumulated in float32 in input order.

    `read(i, rows)` gives input i's `rows` (a slice of axis 0; all of them, once per input, when `rows_per_read` is
    None): one input's copy of those rows is in memory at a time, besides the accumulator.
    """
    acc = np.empty(shape, np.float32)
    rows = acc.reshape(shape or (1,))
    step = rows_per_read or rows.shape[0]
    for i, w in enumerate(weights):
        scale = np.float32(w)
        for r in range(0, rows.shape[0], step):
            target = rows[r:r + step]
            x = read(i, slice(r, r + target.shape[0]))
            if x.size != target.size:
                raise ConversionError(f"input {i}: rows {r}.. of shape {x.shape}, expected {target.shape[1:]}")
            flat_acc, flat_x = target.reshape(-1), x.reshape(-1)
            for s in range(0, flat_x.size, _BLOCK):
                term = flat_x[s:s + _BLOCK].astype(np.float32) * scale
                if i == 0:
                    flat_acc[s:s + _BLOCK] = term
                else:
                    flat_acc[s:s + _BLOCK] += term
            del x, flat_x  # before the next read
    return acc


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, processor / generation configs, remote code, config.json: every plain file of the
    first input but its weights and the files the soup writes itself."""
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and f.name not in _REWRITTEN:
            if is_url(f):  # one of our checkpoints read in place from an object store
                (dst / f.name).write_bytes(f.read_bytes())
            else:
                shutil.copy2(f, dst / f.name)


def _row_reader(readers: Sequence[ParamsReader], path: tuple[str, ...], index: tuple[int, ...], scalar: bool):
    """`read(i, rows)` for `weighted_mean` over the slice `index` of an array (a scalar slice is read whole)."""
    if scalar:
        return lambda i, rows: readers[i].read(path, index)
    return lambda i, rows: readers[i].read(path, (*index, rows))


def _write_ours(ingredients: Sequence[Ingredient], weights: Sequence[float], tmp: Path, bar: tqdm) -> None:
    first = ingredients[0]
    cfg = model_config_from_dict(first.config)
    readers = [ParamsReader(i.path) for i in ingredients]
    # The mapping table says which leading axes of an array stack upstream tensors: each slice is one unit.
    leaves = make_plan(model_entries(cfg), unflatten(readers[0].arrays)).leaves
    writer = ParamsWriter(tmp / PARAMS, leaves, {p: readers[0].arrays[p].dtype for p in leaves})
    units = [(p, idx) for p, leaf in leaves.items()
             for idx in itertools.product(*map(range, leaf.shape[:leaf.stacked]))]
    bar.reset(total=len(units))
    for path, idx in units:
        shape = leaves[path].slice_shape
        # Rows are read CHUNK_BYTES at a time: no input's whole copy of a large tensor is ever in memory.
        row_bytes = math.prod(shape[1:]) * readers[0].arrays[path].dtype.itemsize
        read = _row_reader(readers, path, idx, scalar=not shape)
        writer.write(path, idx, weighted_mean(read, weights, shape, max(1, CHUNK_BYTES // max(1, row_bytes))))
        bar.update()
    writer.finalize()
    save_model_config(tmp, cfg)
    write_step_metadata(tmp)


def _write_upstream(ingredients: Sequence[Ingredient], weights: Sequence[float], tmp: Path, bar: tqdm) -> None:
    specs = [TensorSpec(k, shape, dtype) for k, (shape, dtype) in ingredients[0].arrays.items()]
    sources = [SafetensorsCheckpoint(i.path) for i in ingredients]
    try:
        bar.reset(total=len(specs))
        shapes = {spec.key: spec.shape for spec in specs}
        write_safetensors_dir(tmp, specs, lambda k: weighted_mean(lambda i, _: sources[i][k], weights, shapes[k]),
                              on_tensor=lambda _: bar.update())
    finally:
        for s in sources:
            s.close()


def make_soup(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> str | None:
    """Write the weighted average of `checkpoints` to `out` (atomically, in their format); returns the note about
    normalised weights, if any. Every check runs before anything is written."""
    if len(checkpoints) < 2:
        raise ValueError(f"a soup needs at least 2 checkpoints, got {len(checkpoints)}")
    weights, note = normalize_weights(weights, len(checkpoints))
    check_destination(out, overwrite, checkpoints)
    ingredients = [open_ingredient(c) for c in checkpoints]
    check_homogeneous(ingredients)
    with atomic_destination(out, overwrite) as tmp, tqdm(desc=f"soup -> {Path(out).name}", unit="tensor",
                                                         disable=not progress) as bar:
        write = _write_ours if ingredients[0].format == OURS else _write_upstream
        write(ingredients, weights, tmp, bar)
        _copy_side_files(ingredients[0].path, tmp)
    return note
