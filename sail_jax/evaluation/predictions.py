"""Prediction files: the per-item log a run appends to (and resumes from), and VLMEvalKit's `{model}_{dataset}.xlsx`.

The log is JSON Lines: a header line with the run's settings, then one record per finished item, flushed as it is
written, so a killed run loses at most the item in flight. A rerun skips the items recorded without error, retries
the others (a later record of an index replaces an earlier one), drops a torn last line (an interrupted write) and
refuses a log written with other settings.

VLMEvalKit's prediction file is the benchmark TSV without its `image` column plus `prediction` (its `infer_data_job`),
read back by its evaluators with pandas; .xlsx unless `PRED_FORMAT=tsv`. Excel cells are typed, and evaluators key
rows by `index` (MMBench takes `index % 1e6`), so a column whose cells are all integers (or all numbers) is written as
numbers, as pandas infers them from the TSV; `prediction` is always text.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sail_jax.evaluation.data import Item
from sail_jax.files import apply_umask

log = logging.getLogger(__name__)

PRED_FORMATS = ("xlsx", "tsv")
EXCEL_CELL_LIMIT = 32767  # characters an Excel cell holds
_INT = re.compile(r"[+-]?\d+")
# characters XML 1.0 (so .xlsx) cannot hold; openpyxl refuses them
_ILLEGAL_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def prediction_file_name(model: str, dataset: str, fmt: str) -> str:
    """VLMEvalKit's name for a model's predictions on a dataset."""
    return f"{model}_{dataset}.{fmt}"


class PredictionLog:
    """The append-only per-item log of one run (see the module docstring); `done` maps index -> record."""

    def __init__(self, path: str | Path, header: Mapping[str, Any]):
        self.path = Path(path)
        self.header = dict(header)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.is_file() and self.path.stat().st_size:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.header, ensure_ascii=False) + "\n", encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line: an append the previous run did not finish
            log.warning("%s: dropping the unfinished last line (%d bytes)", self.path, len(data) - end)
            with self.path.open("r+b") as f:
                f.truncate(end)
        lines = data[:end].decode("utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{n}: invalid JSON ({e.msg})") from None
            if n == 1:
                if obj != self.header:
                    keys = sorted(k for k in set(obj) | set(self.header) if obj.get(k) != self.header.get(k))
                    raise ValueError(f"{self.path}: written by a run with other settings (differs in {keys}); "
                                     "remove it or choose another --out")
            elif not isinstance(obj, dict) or "index" not in obj:
                raise ValueError(f"{self.path}:{n}: expected a record with an 'index'")
            else:
                self.records[str(obj["index"])] = obj

    @property
    def done(self) -> dict[str, dict[str, Any]]:
        """Records of the items that finished without error (a rerun skips them)."""
        return {k: r for k, r in self.records.items() if r.get("error") is None}

    def append(self, record: Mapping[str, Any]) -> None:
        self.records[str(record["index"])] = dict(record)
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def prediction_rows(items: Sequence[Item], predictions: Sequence[str]) -> list[dict[str, Any]]:
    """VLMEvalKit prediction rows: each item's TSV cells (no `image`) + `prediction`."""
    return [{**item.fields, "prediction": prediction} for item, prediction in zip(items, predictions)]


def _column_type(values: Sequence[Any]) -> type | None:
    """int or float when every non-empty cell is one (pandas' inference from a TSV), else None (text)."""
    filled = [str(v).strip() for v in values if str(v).strip()]
    if not filled:
        return None
    if all(_INT.fullmatch(v) for v in filled):
        return int
    try:
        [float(v) for v in filled]
    except ValueError:
        return None
    return float


def _write_atomic(path: Path, write) -> None:
    """`write(tmp_path)` beside `path`, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fits_excel(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every cell fits an Excel cell (longer answers need `tsv`)."""
    return all(len(str(v)) <= EXCEL_CELL_LIMIT for row in rows for v in row.values())


def write_predictions(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows as VLMEvalKit's prediction file; the format is the file extension (.xlsx or .tsv)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    if fmt not in PRED_FORMATS:
        raise ValueError(f"{path}: prediction files are {' or '.join(PRED_FORMATS)}")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if fmt == "tsv":  # VLMEvalKit's dump: every field quoted
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, columns, delimiter="\t", quoting=csv.QUOTE_ALL)
                writer.writeheader()
                writer.writerows(rows)
        _write_atomic(path, write)
        return

    from openpyxl import Workbook
    from openpyxl.cell import WriteOnlyCell

    types = {c: None if c in ("prediction", "error") else _column_type([r.get(c, "") for r in rows]) for c in columns}

    def write(tmp: str) -> None:
        book = Workbook(write_only=True)
        sheet = book.create_sheet()

        def cell(column: str, value: Any) -> Any:
            text = "" if value is None else str(value)
            if not text.strip():
                return None  # an empty cell, NaN to pandas as in the TSV
            if types[column] is not None:
                return types[column](text)
            out = WriteOnlyCell(sheet, value=_ILLEGAL_XML.sub("", text))
            out.data_type = "s"  # text, even when it starts with "=" (VLMEvalKit writes no formulas)
            return out

        sheet.append(columns)
        for row in rows:
            sheet.append([cell(c, row.get(c)) for c in columns])
        book.save(tmp)

    _write_atomic(path, write)
