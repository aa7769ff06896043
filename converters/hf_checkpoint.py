"""Read upstream checkpoint directories (config.json + single or sharded safetensors) tensor by tensor."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors.numpy can return it)
import numpy as np
from safetensors import safe_open

from converters.core import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors header dtype names <-> numpy dtypes (only what model weights use)
ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
             "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class SafetensorsCheckpoint:
    """Lazy, key-addressable view of a safetensors checkpoint directory (files opened on demand)."""

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
            self._files = {k: self.dir / f for k, f in weight_map.items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.dir}: no {INDEX_NAME} and no *.safetensors files")
            self._files = {}
            for f in files:
                with self._open(f) as st:
                    for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        self._files[k] = f
        missing = sorted({str(f) for f in self._files.values() if not f.exists()})
        if missing:
            raise ConversionError(f"{self.dir}: shard files listed in the index are missing: {missing}")
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="numpy")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ConversionError(f"{path}: cannot read safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> np.dtype:
        name = self._handle(key).get_slice(key).get_dtype()
        if name not in ST_DTYPES:
            raise ConversionError(f"{self._files[key]}: key {key!r} has unsupported dtype {name}")
        return np.dtype(ST_DTYPES[name])

    def _handle(self, key: str):
        if key not in self._files:
            raise KeyError(key)
        f = self._files[key]
        if f not in self._handles:
            self._handles[f] = self._open(f).__enter__()
        return self._handles[f]

    def __getitem__(self, key: str) -> np.ndarray:
        return self._handle(key).get_tensor(key)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._files:
            yield k, self[k]

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
