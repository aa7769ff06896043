"""Helpers shared by the data pipeline tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def skip_counts(state: Mapping[str, Any]) -> dict[str, list[int]] | None:
    """The skip stage's per-dataset counters ("seen", "truncated", one list per skip reason) found anywhere in a
    nested pipeline iterator state."""
    if "skip_counts" in state:
        return {k: list(v) for k, v in state["skip_counts"].items()}
    for value in state.values():
        if isinstance(value, Mapping) and (found := skip_counts(value)) is not None:
            return found
    return None
