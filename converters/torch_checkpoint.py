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
    """Name what the pickle references, without torch's own advice (re-running with weights_only=False would run
    the file's code: the one fix we must not suggest)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    detail = f"it references {found.group(1)}" if found else "it is not a plain state dict of tensors"
    return ConversionError(
        f"{path}: refused: this pickle needs code to load ({detail}). Only plain state dicts of tensors are "
        "accepted (torch.load with weights_only=True); load it in code you trust and re-save its tensors with "
        "torch.save(model.state_dict(), ...) or safetensors, or convert from the model's Hugging Face safetensors "
        "directory instead."
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
