"""Read a PyTorch state dict (`.bin` / `.pt`) safely: `torch.load(weights_only=True)` only, never arbitrary pickles."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from converters.core import ConversionError


def _refusal(path: Path, err: Exception) -> ConversionError:
    found = re.search(r"Unsupported global: ([^\n]+)", str(err))
    detail = found.group(1).strip() if found else str(err).splitlines()[0]
    return ConversionError(
        f"{path}: refused: this pickle needs code to load ({detail}). Only plain state dicts of tensors are "
        "accepted (torch.load with weights_only=True); re-save it with torch.save(model.state_dict(), ...) from "
        "code you trust."
    )


class TorchStateDict:
    """Key-addressable view of a state dict with upstream key names.

    Files written by `torch.save` (zip format) are memory-mapped, so tensors are paged in one at a time.
    """

    def __init__(self, path: str | Path):
        import torch

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such state-dict file")
        try:
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy, non-zip format
        except pickle.UnpicklingError as e:
            raise _refusal(self.path, e) from None
        if not isinstance(sd, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
            raise ConversionError(f"{self.path}: expected a flat mapping of key -> tensor (a state dict)")
        self._sd = sd

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> np.dtype:
        import torch

        t = self._sd[key]
        if t.dtype == torch.bfloat16:
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(str(t.dtype).removeprefix("torch."))

    def __getitem__(self, key: str) -> np.ndarray:
        import torch

        t = self._sd[key].detach().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
