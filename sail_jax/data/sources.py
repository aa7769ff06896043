"""Random-access record sources for LLaVA-style conversation data (JSONL or ArrayRecord) and the record parser.

A record is one JSON object: `{"id", "image": path | [paths] (optional), "conversations": [{"from": "human" |
"gpt" | "system", "value": str}, ...]}`, or a LLaVA-Video-style one with `"video": path` instead of images; image
and video paths are relative to a media root (by default the data file's directory). Sources return the raw bytes
plus a `where` string ("file:line" or "file:record N"), and parsing happens in the per-sample transform, so a
malformed line becomes a counted, located skip instead of a crash at start-up.

Both sources implement Grain's random-access protocol (`__len__`, `__getitem__`) and pickle cheaply into worker
processes: the JSONL source keeps only its line-offset index and opens the file lazily in each process.

A data file may be a URL (`gs://...`): both sources read by byte offset from a local file, so such a file is fetched
once into the host's local cache (`files.local_copy`, shared by the Grain workers and later runs; its `where`
strings still name the URL). Image and video paths of a record under a URL media root are URLs too.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from sail_jax.files import as_path, is_url, local_file

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSample(ValueError):
    """A record that cannot become a training sample; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RawRecord:
    """One undecoded record and where it came from."""

    data: bytes
    where: str


def local_data_file(path: str | os.PathLike) -> Path:
    """The local file to read for the data file `path`: itself, or for a URL its local copy (`local_copy`)."""
    if is_url(path):
        return local_file(path, "data file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file not found: {Path(path)}")
    return Path(path)


def data_file_name(path: str | os.PathLike) -> str:
    """How messages name the data file `path` (a URL as given, a local path as pathlib writes it)."""
    return os.fspath(path) if is_url(path) else str(Path(path))


class JsonlSource:
    """Lines of a JSONL file by index (blank lines are not records). Line numbers (1-based) are kept for messages."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.name = local_data_file(path), data_file_name(path)
        starts, ends, lines = [], [], []
        with open(self.path, "rb") as f:  # one streaming pass: offsets only, never the whole file in memory
            pos = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    starts.append(pos)
                    ends.append(pos + len(line))
                    lines.append(number)
                pos += len(line)
        self._starts, self._ends = np.array(starts, np.int64), np.array(ends, np.int64)
        self._lines = np.array(lines, np.int64)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> RawRecord:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        start, end = int(self._starts[index]), int(self._ends[index])
        # pread is positional, so the read threads of one process can share the descriptor.
        return RawRecord(os.pread(self._fd, end - start, start), f"{self.name}:{int(self._lines[index])}")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"JsonlSource({self.name!r}, {len(self)} records)"


class ArrayRecordSource:
    """Records of an ArrayRecord file (one JSON object each, as written by `jsonl_to_arrayrecord`)."""

    def __init__(self, path: str | os.PathLike):
        import grain

        self.path, self.name = local_data_file(path), data_file_name(path)
        self._source = grain.sources.ArrayRecordDataSource([str(self.path)])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> RawRecord:
        return RawRecord(self._source[index], f"{self.name}:record {index + 1}")

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.name!r}, {len(self)} records)"


def open_source(path: str | os.PathLike) -> JsonlSource | ArrayRecordSource:
    """The source for a data file, by extension: `.jsonl` (or `.json`) or `.arrayrecord`/`.array_record`."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return JsonlSource(path)
    if suffix in (".arrayrecord", ".array_record"):
        return ArrayRecordSource(path)
    raise ValueError(f"unknown data file type {suffix!r} for {path}: expected .jsonl or .arrayrecord")


@dataclass(frozen=True)
class Conversation:
    """A parsed record: messages in the processor's form (roles system/user/assistant), absolute image paths and the
    absolute video path (a record has images or a video, not both)."""

    messages: list[dict[str, str]]
    images: list[Path | epath.Path]
    id: str | None = None
    video: Path | epath.Path | None = None


def decode_object(data: bytes) -> dict:
    """One JSONL line as a JSON object; anything else is a `BadSample("malformed", ...)`."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadSample("malformed", f"not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise BadSample("malformed", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_record(data: bytes, image_root: str | os.PathLike, allow_absolute: bool = False) -> Conversation:
    """Decode and validate one LLaVA-style record; every problem is a `BadSample("malformed", ...)`. Image paths
    must stay under `image_root` unless `allow_absolute` (`resolve_image_path`)."""
    obj = decode_object(data)
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSample("malformed", "missing or empty 'conversations' list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSample("malformed", f"conversations[{i}] must be an object with a string 'value'")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise BadSample("malformed", f"conversations[{i}] has unknown role {turn.get('from')!r}")
        if role == "system" and i != 0:
            raise BadSample("malformed", f"conversations[{i}]: a system message may only come first")
        messages.append({"role": role, "content": turn["value"]})
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise BadSample("malformed", "no assistant ('gpt') response to train on")
    image = obj.get("image", [])
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise BadSample("malformed", "'image' must be a path or a list of paths")
    video = obj.get("video")
    if video is not None and (not isinstance(video, str) or not video):
        raise BadSample("malformed", "'video' must be a path")
    if video is not None and paths:
        raise BadSample("malformed", "a record has 'image' or 'video', not both")
    try:
        images = [resolve_image_path(image_root, p, allow_absolute) for p in paths]
        video_path = None if video is None else resolve_image_path(image_root, video, allow_absolute)
    except ValueError as e:
        raise BadSample("malformed", str(e)) from None
    record_id = obj.get("id")
    return Conversation(messages, images, None if record_id is None else str(record_id), video_path)


def resolve_image_path(root: str | os.PathLike, name: str, allow_absolute: bool = False) -> Path | epath.Path:
    """`root / name`, refused unless it stays under `root` (`../` or an absolute path would let a data or request
    file open any file of the host) or `allow_absolute` says the paths are trusted. The check is on the normalised
    path, not the resolved one: symlinks a dataset owner placed under the root keep working. Under a URL root the
    result is a URL (`epath.Path`)."""
    path = Path(name)
    base = as_path(root) if is_url(root) else Path(root)
    if allow_absolute:
        return path if path.is_absolute() else base / name
    if path.is_absolute():
        raise ValueError(f"image path {name!r} is absolute; paths are relative to the image root {root} (allow "
                         f"absolute paths with the allow_absolute_image_paths option)")
    if Path(os.path.normpath(path)).parts[:1] == ("..",):
        raise ValueError(f"image path {name!r} leaves the image root {root}")
    return base / name


def jsonl_to_arrayrecord(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Copy the non-blank lines of a JSONL file into an ArrayRecord file, one record each (byte for byte, so
    malformed lines still surface, located, when the data is read). Returns the record count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    source = JsonlSource(src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    # group_size:1 keeps every record individually addressable: cheap random access for global shuffling.
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    try:
        for i in range(len(source)):
            writer.write(source[i].data.rstrip(b"\r\n"))
    finally:
        writer.close()
    os.replace(tmp, dst)
    return len(source)
