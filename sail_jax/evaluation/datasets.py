"""What a VLMEvalKit dataset name implies: the answer kind (`--kind`) and the benchmark metric that scores it.

Names are matched case-insensitively on their first `_`/`-` separated word, followed only by VLMEvalKit's split and
language suffixes (`MMBench_DEV_EN_V11`, `AI2D_TEST_NO_MASK`, `MathVista_MINI`, `MMMU_DEV_VAL` …); a directory and a
file extension are ignored. Other benchmarks that share a first word (`MME-RealWorld`, `OCRBench_v2`, `MMMU_Pro`,
`MMBench-Video`) score differently, so they are not recognised and need an explicit `--kind`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import PurePath
from typing import Any

from sail_jax.evaluation.extraction import mathvista, mmmu
from sail_jax.evaluation.metrics import (
    Row,
    anls,
    hallusionbench,
    mcq_accuracy,
    mmbench_circular,
    mme,
    mmvet,
    ocrbench,
    relaxed_accuracy,
    vqa_soft_accuracy,
)

METRICS: dict[str, Callable[[Iterable[Row]], dict[str, Any]]] = {
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "vqa_soft": vqa_soft_accuracy,
    "mcq_accuracy": mcq_accuracy,
    "mmbench_circular": mmbench_circular,
    "mme": mme,
    "hallusionbench": hallusionbench,
    "ocrbench": ocrbench,
    "mmmu": mmmu,
    "mathvista": mathvista,
    "mmvet": mmvet,
}

# first word of the dataset name -> (kind, metric)
_DATASETS = {
    "mmbench": ("mcq", "mmbench_circular"),
    "mmstar": ("mcq", "mcq_accuracy"),
    "ai2d": ("mcq", "mcq_accuracy"),
    "mmmu": ("mcq", "mmmu"),
    "mme": ("yn", "mme"),
    "hallusionbench": ("yn", "hallusionbench"),
    "ocrbench": ("ocr", "ocrbench"),
    "docvqa": ("vqa", "anls"),
    "infovqa": ("vqa", "anls"),
    "chartqa": ("vqa", "relaxed_accuracy"),
    "textvqa": ("vqa", "vqa_soft"),
    "mathvista": ("vqa", "mathvista"),
    "mmvet": ("vqa", "mmvet"),
}
_SUFFIXES = frozenset({"dev", "test", "val", "validation", "mini", "testmini", "en", "cn", "v11", "no", "mask"})
_FILE_EXTENSIONS = (".tsv", ".xlsx", ".csv", ".json", ".jsonl")


def infer_kind(dataset_name: str) -> tuple[str, str] | None:
    """(kind, metric) for a known benchmark name, or None (the caller then needs an explicit kind)."""
    path = PurePath(dataset_name)
    name = (path.stem if path.suffix.lower() in _FILE_EXTENSIONS else path.name).lower()
    words = [w for w in re.split(r"[_\-\s]+", name) if w]
    if not words or words[0] not in _DATASETS or any(w not in _SUFFIXES for w in words[1:]):
        return None
    return _DATASETS[words[0]]


def compute(metric: str, rows: Iterable[Row]) -> dict[str, Any]:
    """The scores of benchmark metric `metric` (a key of METRICS) over prediction rows."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return METRICS[metric](rows)
