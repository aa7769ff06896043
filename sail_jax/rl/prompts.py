"""RL prompt files: JSONL records `{"id", "image": path | [paths] (optional), "question", "answer", "kind"}`.

`kind` picks the answer reward ("math" | "mcq" | "count" | "open"). Image paths are relative to an image root (by
default the data file's directory), as for SFT data. Bad lines (invalid JSON, missing or mistyped keys, an unknown
kind) are skipped and counted per reason with their `file:line`, as the SFT loader does, so one broken line does not
stop a run; a file with no usable prompt is an error.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from etils import epath

from sail_jax.data.sources import BadSample, JsonlSource, decode_object
from sail_jax.files import as_path, is_url, parent_dir
from sail_jax.rl.rewards import KINDS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RLPrompt:
    """One RL prompt; `answer` is the reference the reward compares with (text, also for counts)."""

    id: str
    question: str
    answer: str
    kind: str
    images: tuple[Path | epath.Path, ...] = ()  # URLs under a URL image root


@dataclass
class PromptSet:
    """The usable prompts of a file and what was skipped: counts per reason and one "file:line: message" each."""

    prompts: list[RLPrompt]
    skipped: Counter = field(default_factory=Counter)
    bad_lines: list[str] = field(default_factory=list)


def _text(obj: dict, key: str, numbers: bool = False) -> str:
    value = obj.get(key)
    if isinstance(value, str) and value.strip():
        return value
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise BadSample("malformed", f"missing or invalid {key!r}" + (" (string or number)" if numbers else " (string)"))


def parse_prompt(data: bytes, image_root: str | os.PathLike) -> RLPrompt:
    """Decode and validate one RL prompt record; problems raise `BadSample("malformed" | "unknown_kind", ...)`."""
    obj = decode_object(data)
    record_id, question = _text(obj, "id", numbers=True), _text(obj, "question")
    answer = _text(obj, "answer", numbers=True)
    kind = obj.get("kind")
    if kind not in KINDS:
        raise BadSample("unknown_kind", f"kind {kind!r} is not one of {list(KINDS)}")
    image = obj.get("image", [])
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise BadSample("malformed", "'image' must be a path or a list of paths")
    root = as_path(image_root) if is_url(image_root) else Path(image_root)
    return RLPrompt(record_id, question, answer, kind, tuple(root / p for p in paths))


def read_prompts(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> PromptSet:
    """All usable prompts of a JSONL file, in file order, with the skipped lines counted and located."""
    source = JsonlSource(path)
    root = parent_dir(path) if image_root is None else image_root
    result = PromptSet([])
    for i in range(len(source)):
        record = source[i]
        try:
            result.prompts.append(parse_prompt(record.data, root))
        except BadSample as e:
            result.skipped[e.reason] += 1
            result.bad_lines.append(f"{record.where}: {e}")
    if result.bad_lines:
        log.warning("%s: skipped %d bad line(s) %s; first: %s", path, len(result.bad_lines), dict(result.skipped),
                    result.bad_lines[0])
    if not result.prompts:
        raise ValueError(f"{path}: no usable RL prompt" + (f" (first problem: {result.bad_lines[0]})"
                                                           if result.bad_lines else ""))
    return result
