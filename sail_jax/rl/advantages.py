"""Group-relative advantages (GRPO / Dr.GRPO) and DAPO's overlong length shaping, on host arrays.

Rewards are scored on the host (text answers, judges), so these work in NumPy and return float32 arrays ready to be
put on the mesh with the rollout batch.
"""

from __future__ import annotations

import numpy as np


def group_advantages(rewards, group_ids, *, scale_by_std: bool = True, eps: float = 1e-6) -> np.ndarray:
    """(r - group mean) / (group std + eps), std with ddof=1; `scale_by_std=False` gives Dr.GRPO's r - group mean.

    Group ids are any integers (not necessarily contiguous). A group of one sample has no spread to learn from: its
    std is taken as 0 and its advantage is 0 (its mean is its own reward), never NaN. (verl instead uses mean 0 and
    std 1 there, i.e. advantage = the raw reward.)"""
    r = np.asarray(rewards, np.float64)
    g = np.asarray(group_ids)
    if r.ndim != 1 or g.shape != r.shape:
        raise ValueError(f"rewards and group_ids must both be [N], got {r.shape} and {g.shape}")
    if r.size == 0:
        return np.zeros(0, np.float32)
    _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    mean = np.bincount(inverse, weights=r) / counts
    centred = r - mean[inverse]
    if not scale_by_std:
        return centred.astype(np.float32)
    sq = np.bincount(inverse, weights=centred**2)
    std = np.sqrt(np.where(counts > 1, sq / np.maximum(counts - 1, 1), 0.0))
    return (centred / (std[inverse] + eps)).astype(np.float32)


def overlong_penalty(lengths, *, max_len: int, buffer_len: int, factor: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment min(-(L - (max_len - buffer_len)) / buffer_len * factor, 0): 0 up to
    max_len - buffer_len, then linear down to -factor at max_len. L is the response length in TOKENS."""
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"need 0 < buffer_len <= max_len, got buffer_len={buffer_len}, max_len={max_len}")
    lengths = np.asarray(lengths, np.float64)
    expected = max_len - buffer_len
    return np.minimum(-(lengths - expected) / buffer_len * factor, 0.0).astype(np.float32)
