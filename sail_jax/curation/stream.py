"""Streaming JSONL in, JSONL out, for every curation verb: records are read one line at a time, checked by the SFT
loader's own parser (so a record curation keeps is one training accepts), and written to a temporary file that
replaces the output only when the whole run succeeded; the JSON report (kept, dropped per reason, bad lines with
file:line) is written the same way. Memory is constant in the file size: only the first `MAX_LISTED_BAD` bad lines
are listed in the report (all are counted).
"""

from __future__ import annotations

import json
import os
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sail_jax.data.sources import BadSample, Conversation, parse_record

MAX_LISTED_BAD = 100


@dataclass
class Record:
    """One valid input record: the JSON object as read (extra fields such as judge scores kept), the loader's parse
    of it (roles normalised, image paths joined to the image root) and where it came from ("file:line")."""

    obj: dict[str, Any]
    conversation: Conversation
    where: str


@dataclass
class Report:
    """What a run kept and dropped, and why. `stats` holds the verb's own figures (entropies, bucket counts)."""

    verb: str
    source: str
    output: str
    params: dict[str, Any]
    records: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    bad_lines: int = 0
    bad: list[dict[str, str]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def add_bad(self, where: str, reason: str, error: str) -> None:
        self.bad_lines += 1
        if len(self.bad) < MAX_LISTED_BAD:
            self.bad.append({"where": where, "reason": reason, "error": error})

    def as_dict(self) -> dict[str, Any]:
        return {"verb": self.verb, "input": self.source, "output": self.output, "params": self.params,
                "records": self.records, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "bad_lines": self.bad_lines, "bad": self.bad, "stats": self.stats}

    def summary(self) -> str:
        drops = ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped.items())) or "none"
        return (f"{self.verb}: kept {self.kept} of {self.records} records (dropped {drops}); "
                f"{self.bad_lines} bad lines")


def read_records(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 report: Report | None = None) -> Iterator[Record]:
    """Valid records of a JSONL file, one line at a time (blank lines are not records). A line the loader would
    skip as malformed is counted in `report` with its file:line (when a report is given) and not yielded;
    `image_root` defaults to the file's directory, as for the loader."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                conversation = parse_record(line, root)
            except BadSample as e:
                if report is not None:
                    report.add_bad(where, e.reason, str(e))
                continue
            if report is not None:
                report.records += 1
            # Decoded again for the object itself: verbs keep and rewrite fields the loader's parse drops.
            yield Record(json.loads(line), conversation, where)


def _open_temp(path: Path) -> tuple[IO[str], Path]:
    """A new file beside `path` (same filesystem, so the final rename is atomic), created with the user's umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return os.fdopen(fd, "w", encoding="utf-8"), tmp


class Curation:
    """One run of a verb: `records()` streams the input (bad lines counted), `keep(obj)` writes, `drop(reason)`
    counts. Used as a context manager: on success the output and the report replace their destinations; on any
    error (or too many bad lines) both temporary files are removed and nothing is written."""

    def __init__(self, verb: str, src: str | os.PathLike, out: str | os.PathLike, report: str | os.PathLike,
                 params: dict[str, Any], image_root: str | os.PathLike | None = None,
                 max_bad_fraction: float = 0.05):
        self.src, self.out, self.report_path = Path(src), Path(out), Path(report)
        if not self.src.is_file():
            raise FileNotFoundError(f"data file not found: {self.src}")
        if len({self.src.resolve(), self.out.resolve(), self.report_path.resolve()}) != 3:
            raise ValueError(f"--in, --out and --report must be three different files (got {src}, {out}, {report})")
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"--max-bad-fraction must be in [0, 1], got {max_bad_fraction}")
        self.image_root, self.max_bad_fraction = image_root, max_bad_fraction
        self.report = Report(verb, str(self.src), str(self.out), params)
        self._file: IO[str] | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> Curation:
        self._file, self._tmp = _open_temp(self.out)
        return self

    def records(self) -> Iterator[Record]:
        return read_records(self.src, self.image_root, self.report)

    def keep(self, obj: dict[str, Any]) -> None:
        self._file.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.report.kept += 1

    def drop(self, reason: str) -> None:
        self.report.dropped[reason] += 1

    def bad(self, record: Record, reason: str, error: str) -> None:
        """A record that parsed but cannot be used (e.g. its image is missing): a bad line, like the loader's."""
        self.report.records -= 1
        self.report.add_bad(record.where, reason, error)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        report_tmp = None
        try:
            if exc_type is None:
                self._check_bad_fraction()
                report_file, report_tmp = _open_temp(self.report_path)
                with report_file:
                    json.dump(self.report.as_dict(), report_file, indent=2, ensure_ascii=False)
                    report_file.write("\n")
                os.replace(self._tmp, self.out)
                os.replace(report_tmp, self.report_path)
        finally:
            for tmp in (self._tmp, report_tmp):
                if tmp is not None and tmp.exists():
                    tmp.unlink()

    def _check_bad_fraction(self) -> None:
        r = self.report
        total = r.records + r.bad_lines
        if total and r.bad_lines > self.max_bad_fraction * total:
            first = r.bad[0]
            raise ValueError(f"{self.src}: {r.bad_lines} of {total} lines are unusable (first: {first['where']}: "
                             f"{first['error']}), more than --max-bad-fraction {self.max_bad_fraction}; "
                             f"nothing written")
