"""Read upstream checkpoint directories (config.json + single or sharded safetensors) tensor by tensor.

Tensors are read with plain file reads into fresh arrays. (The safetensors library memory-maps each file, and
every page it touches stays in the process's resident set while the file is open: converting a 1 GB shard that
way leaves 1 GB resident on top of the tensor being converted.)

An upstream directory on an object store (`gs://...`) is read from its local copy (`local_upstream_dir`): tensors
are read by byte offset, and the tokenizer libraries open local files.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

from converters.core import ConversionError
from sail_jax.files import as_path, is_url, local_copy

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors header dtype names <-> numpy dtypes (only what model weights use)
ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
             "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def local_upstream_dir(directory: str | os.PathLike) -> Path:
    """An upstream directory (config.json, safetensors, tokenizer files) as a local `Path`: itself, or for a URL its
    whole local copy (`files.local_copy`, made once per content and shared by later runs). A URL without
    config.json is refused before anything is copied."""
    if not is_url(directory):
        return Path(directory)
    if not (as_path(directory) / "config.json").is_file():
        raise FileNotFoundError(f"{directory}/config.json: no such file (not an upstream checkpoint directory)")
    return local_copy(directory)


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, header dict) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                begin, end = info["data_offsets"]
                if info["dtype"] not in ST_DTYPES:
                    raise ValueError(f"key {key!r} has unsupported dtype {info['dtype']}")
                if end - begin != math.prod(info["shape"]) * np.dtype(ST_DTYPES[info["dtype"]]).itemsize:
                    raise ValueError(f"key {key!r}: data_offsets do not match its shape and dtype")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ConversionError(f"{path}: cannot read safetensors file ({e})") from None
    return 8 + n, header


class SafetensorsCheckpoint:
    """Lazy, key-addressable view of a safetensors checkpoint directory (headers read up front, data on demand)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir}: not a checkpoint directory")
        index = self.dir / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: invalid safetensors index ({e})") from None
            files = sorted({self.dir / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise ConversionError(f"{self.dir}: shard files listed in the index are missing: {missing}")
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.dir}: no {INDEX_NAME} and no *.safetensors files")
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        self.metadata: dict[Path, dict | None] = {}
        for f in files:
            start, header = read_header(f)
            self.metadata[f] = header.pop("__metadata__", None)
            for k, info in header.items():
                self._entries[k] = (f, start, info)
        if index.exists():
            wrong = sorted(k for k, f in weight_map.items() if k not in self._entries or self._entries[k][0].name != f)
            if wrong:
                raise ConversionError(f"{index}: keys not stored in the shard the index names: {wrong[:5]}")
        self._handles: dict[Path, BinaryIO] = {}

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][2]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(ST_DTYPES[self._entries[key][2]["dtype"]])

    def __getitem__(self, key: str) -> np.ndarray:
        path, start, info = self._entries[key]
        out = np.empty(self.shape(key), self.dtype(key))
        if path not in self._handles:
            self._handles[path] = open(path, "rb")  # noqa: SIM115 (kept open until close())
        f = self._handles[path]
        f.seek(start + info["data_offsets"][0])
        if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
            raise ConversionError(f"{path}: file ends inside tensor {key!r}")
        return out

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._entries:
            yield k, self[k]

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
