"""Write upstream-style safetensors checkpoints one tensor at a time (bounded memory, any total size).

`safetensors.save_file` needs a whole shard in memory (up to 5 GB here). The format is simple enough to stream
instead: every tensor's key, dtype and shape are known before any data is produced, so each shard's header is
written first and the tensors' bytes are appended in header order as they arrive.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

from converters.core import ConversionError
from converters.hf_checkpoint import INDEX_NAME, SINGLE_NAME, ST_DTYPES

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes, as transformers' "5GB"
BLOCK_BYTES = 64 * 2**20  # a tensor is copied / cast / written in blocks of about this size
_NAME_OF_DTYPE = {v: k for k, v in ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count -> bytes (decimal units as transformers uses)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    unit = next((u for u in units if s.endswith(u)), None)
    number, mult = (s[: -len(unit)].strip(), units[unit]) if unit else (s, 1)
    try:
        value = int(float(number) * mult)
    except ValueError:
        raise ValueError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 1048576)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most `max_shard_size` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def _header(specs: Sequence[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        if spec.dtype.name not in _NAME_OF_DTYPE:
            raise ConversionError(f"{spec.key}: dtype {spec.dtype.name} cannot be written to safetensors")
        header[spec.key] = {
            "dtype": _NAME_OF_DTYPE[spec.dtype.name],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors itself does
    return struct.pack("<Q", len(raw)) + raw


def _write_blocks(f, arr: np.ndarray, dtype: np.dtype) -> None:
    """Append `arr` (any view) as C-order bytes of `dtype`, copying at most BLOCK_BYTES at a time."""
    arr = arr.reshape(1) if arr.ndim == 0 else arr
    rows = max(1, BLOCK_BYTES // max(1, arr[0].size * dtype.itemsize))
    for start in range(0, arr.shape[0], rows):
        f.write(np.ascontiguousarray(arr[start : start + rows], dtype=dtype).reshape(-1).view(np.uint8).data)


def write_safetensors_dir(
    directory: Path,
    specs: Sequence[TensorSpec],
    get: Callable[[str], np.ndarray],
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> None:
    """Write `specs` (in order) as model.safetensors, or as numbered shards plus model.safetensors.index.json.

    `get(key)` produces each tensor (any view) when its turn comes, in its spec's shape; it is cast to the
    spec's dtype block by block.
    """
    shards = plan_shards(specs, max_shard_size)
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for name, shard in zip(names, shards):
        with open(directory / name, "wb") as f:
            f.write(_header(shard))
            for spec in shard:
                arr = get(spec.key)
                if tuple(arr.shape) != spec.shape:
                    raise ConversionError(f"{spec.key}: produced shape {list(arr.shape)}, expected {list(spec.shape)}")
                _write_blocks(f, arr, spec.dtype)
                del arr
                if on_tensor is not None:
                    on_tensor(spec)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {s.key: name for name, shard in zip(names, shards) for s in shard},
        }
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
