"""Helpers shared by the trainer tests: read metrics, TensorBoard events and checkpoint items."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY_GIN = str(REPO / "tests" / "data" / "trainer_tiny.gin")


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def event_tags(workdir: Path) -> dict[str, int]:
    """{tag: number of scalars} from the TensorBoard event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    counts: dict[str, int] = {}
    for f in sorted((Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4
            for v in ev.summary.value:
                counts[v.tag] = counts.get(v.tag, 0) + 1
    return counts


def load_item(workdir: Path, step: int, item: str) -> Any:
    """A checkpoint item as a numpy tree (params / opt_state / adalrs_*), or the JSON dict (train_state)."""
    import orbax.checkpoint as ocp

    d = Path(workdir).absolute() / "checkpoints" / str(step) / item
    if item == "train_state":
        return json.loads((d / "metadata").read_text())
    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(d))


def trees_equal(a: Any, b: Any) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True) for x, y in zip(la, lb)
    )
