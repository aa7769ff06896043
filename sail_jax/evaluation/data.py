"""VLMEvalKit benchmark files (TSV) and the prompts VLMEvalKit builds for SAIL-VL2 (its tiling and chat rules).

TSV layout: columns `index`, `image`, `question`, `answer`, optional `hint`, `category` and option columns `A`, `B`, …
An `image` cell holds base64 image data, a list of them for multi-image rows (a JSON / Python list literal, as
VLMEvalKit writes it), or — VLMEvalKit's space saver — the `index` of another row whose image it shares.

Video benchmarks (Video-MME layout) have a `video` column instead of `image`: a file path relative to a data root
(default: the TSV's directory); their options are letter columns or a `candidates` / `options` list literal
(`['A. apple', 'B. pear']`, or bare texts lettered in order), and the category is `category`, else `task_type`.
The prompt lists the sampled frames (`Frame-k: <image>` lines, one tile each) before the question text.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sail_jax.data.chat import vlmevalkit_prompt, with_thinking
from sail_jax.data.images import load_image, multi_image_max_num, vlmevalkit_max_num
from sail_jax.data.processor import SailProcessor
from sail_jax.data.video import DEFAULT_NUM_FRAMES, VIDEO_PLACEHOLDER, frame_lines, load_video
from sail_jax.files import as_path, is_url, local_copy, parent_dir

REQUIRED_COLUMNS = ("index", "image", "question", "answer")
VIDEO_OPTION_COLUMNS = ("candidates", "options")
_LETTERED = re.compile(r"^\(?([A-Z])[.)]\s*(.*)$", re.DOTALL)
MCQ_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
MCQ_SUFFIX_CN = "\n请直接回答选项字母。"
OPEN_SUFFIX = "\nAnswer the question directly."
OPEN_SUFFIX_CN = "\n请直接回答问题。"
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
DETAIL_SUFFIX = "\nAnswer this question in detail."
# VQA sets whose question VLMEvalKit passes unchanged
_PLAIN_VQA = ("MathVista", "MathVision", "VCR", "MTVQA", "MMVet", "MathVerse", "MMDU", "CRPE", "MIA-Bench", "MM-Math",
              "DynaMath", "QSpatial")
_CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass(frozen=True)
class VideoRef:
    """A video row's file and how its frames are sampled (`num_frames` uniformly, or at `fps`)."""

    path: str  # a local path or a URL
    num_frames: int = DEFAULT_NUM_FRAMES
    fps: float | None = None


@dataclass
class Item:
    """One benchmark row: `images` holds base64 strings (decoded lazily), or `video` the row's video file;
    `answers` the acceptable answers."""

    index: str
    row: int  # 1-based data row in the file, for messages
    question: str
    answers: list[str]
    images: list[str]
    options: dict[str, str] = field(default_factory=dict)
    hint: str | None = None
    category: str | None = None
    video: VideoRef | None = None
    fields: dict[str, str] = field(default_factory=dict)  # every cell but `image`, in file order (prediction files)


def join(root: str, name: str) -> str:
    """`name` under `root`, a local directory or a URL."""
    return f"{root.rstrip('/')}/{name}" if is_url(root) else str(Path(root) / name)


def _where(path: Path | str, row: int, index: str) -> str:
    return f"{path}: row {row} (index {index})"


def _parse_list(text: str) -> list[str] | None:
    """A JSON or Python list literal of strings, else None."""
    text = text.strip()
    if not text.startswith("["):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, list):
            return [str(v) for v in value]
    return None


def _video_options(cell: str, where: str) -> dict[str, str]:
    """A `candidates` list literal as {letter: text}: `A. text` entries keep their letter, bare texts are lettered
    in order."""
    entries = _parse_list(cell)
    if entries is None:
        raise ValueError(f"{where}: the options cell is not a list literal: {cell[:60]!r}")
    matches = [_LETTERED.match(e.strip()) for e in entries]
    if entries and all(matches):
        return {m.group(1): m.group(2).strip() for m in matches}
    return {string.ascii_uppercase[k]: e.strip() for k, e in enumerate(entries)}


def read_tsv(path: str | Path, data_root: str | Path | None = None, num_frames: int = DEFAULT_NUM_FRAMES,
             fps: float | None = None) -> list[Item]:
    """All rows of a VLMEvalKit TSV; a missing column or an empty required cell names the file, row and column.
    Video rows take their files under `data_root` (default: the TSV's directory), sampled by `num_frames` / `fps`."""
    if is_url(path):  # read from a local copy (`files.local_copy`); messages still name the URL
        if not as_path(path).is_file():
            raise FileNotFoundError(f"{path}: no such benchmark file")
        local, path = local_copy(path), str(path)  # `Path` would fold gs:// into gs:/
    else:
        local = path = Path(path)
    if not local.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark file")
    csv.field_size_limit(sys.maxsize)
    with local.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        is_video = "video" in columns and "image" not in columns
        required = ("index", "video", "question", "answer") if is_video else REQUIRED_COLUMNS
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {columns}")
        option_cols = [c for c in string.ascii_uppercase if c in columns]
        raw = list(reader)
    if is_video:
        root = str(data_root) if data_root is not None else parent_dir(str(path))
        return [_video_item(path, n, r, root, option_cols, num_frames, fps) for n, r in enumerate(raw, start=1)]
    by_index = {r["index"]: r for r in raw}
    items = []
    for n, r in enumerate(raw, start=1):
        where = _where(path, n, r["index"])
        for col in required:
            if not (r.get(col) or "").strip():
                raise ValueError(f"{where}: empty {col!r}")
        cell = r["image"].strip()
        if len(cell) <= 64 and cell in by_index and cell != r["index"]:  # shares another row's image
            cell = by_index[cell]["image"].strip()
        answer = r["answer"].strip()
        items.append(Item(
            index=r["index"],
            row=n,
            question=r["question"],
            answers=_parse_list(answer) or [answer],
            images=_parse_list(cell) or [cell],
            options={c: r[c] for c in option_cols if (r.get(c) or "").strip()},
            hint=(r.get("hint") or "").strip() or None,
            category=(r.get("category") or "").strip() or None,
            fields={c: r.get(c) or "" for c in columns if c != "image"},
        ))
    return items


def _video_item(path: Path | str, n: int, r: dict[str, str], root: Path, option_cols: list[str], num_frames: int,
                fps: float | None) -> Item:
    where = _where(path, n, r["index"])
    for col in ("index", "video", "question", "answer"):
        if not (r.get(col) or "").strip():
            raise ValueError(f"{where}: empty {col!r}")
    options = {c: r[c] for c in option_cols if (r.get(c) or "").strip()}
    listed = next((r[c] for c in VIDEO_OPTION_COLUMNS if (r.get(c) or "").strip()), None)
    if not options and listed is not None:
        options = _video_options(listed, where)
    answer = r["answer"].strip()
    return Item(
        index=r["index"], row=n, question=r["question"], answers=_parse_list(answer) or [answer], images=[],
        options=options, hint=(r.get("hint") or "").strip() or None,
        category=(r.get("category") or r.get("task_type") or "").strip() or None,
        video=VideoRef(join(root, r["video"].strip()), num_frames, fps),
    )


def encode_video_item(processor: SailProcessor, item: Item, kind: str, dataset: str | None, thinking: bool = False,
                      source: str | Path = "") -> tuple[str, dict[str, np.ndarray]]:
    """(user prompt with placeholders, processor output) for a video row, as VLMEvalKit asks SAIL-VL2: the
    `Frame-k: <image>` lines, then the question text (options and letter instruction for MCQ); one tile per frame."""
    ref = item.video
    try:
        video = load_video(ref.path, ref.num_frames, ref.fps)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{_where(source, item.row, item.index)}: column 'video': {e}") from None
    text = question_prompt(item, kind, dataset)
    text = with_thinking(text) if thinking else text
    enc = processor.encode_video([{"role": "user", "content": VIDEO_PLACEHOLDER + "\n" + text}], video,
                                 add_generation_prompt=True)
    return frame_lines(len(video.indices)) + text, enc


def decode_images(item: Item, path: str | Path = "") -> list[Image.Image]:
    """The row's images as RGB PIL images (VLMEvalKit converts to RGB before tiling)."""
    out = []
    for k, data in enumerate(item.images):
        try:  # the one image policy of every reader (data.images.load_image), decompression bombs included
            out.append(load_image(base64.b64decode(data, validate=False), convert_rgb=True))
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"{_where(path, item.row, item.index)}: column 'image', image {k}: "
                             f"not decodable base64 image data ({e})") from None
    return out


def question_prompt(item: Item, kind: str, dataset: str | None) -> str:
    """The text VLMEvalKit asks SAIL-VL2 (`build_prompt` of its InternVL-style wrapper), without images."""
    name = dataset or ""
    if kind == "mcq":
        question = f"{item.hint}\n{item.question}" if item.hint else item.question
        for letter, text in item.options.items():
            question += f"\n{letter}. {text}"
        cn = bool(_CJK.search(question))
        if item.options:
            return question + (MCQ_SUFFIX_CN if cn else MCQ_SUFFIX)
        return question + (OPEN_SUFFIX_CN if cn else OPEN_SUFFIX)
    if kind == "yn":
        if "MME" in name:
            return item.question + " Answer the question using a single word or phrase."
        if "HallusionBench" in name or "AMBER" in name:
            return item.question + " Please answer yes or no. Answer the question using a single word or phrase."
        return item.question
    if any(s in name for s in ("LLaVABench", "WildVision")):
        return item.question + DETAIL_SUFFIX
    if any(s in name for s in _PLAIN_VQA):
        return item.question
    return item.question + SHORT_SUFFIX


def build_prompt(item: Item, kind: str, dataset: str | None, thinking: bool = False) -> str:
    """Full user text with `<image>` placeholders: one image -> `<image>\\n{text}`; several ->
    `Image-1: <image>\\n…{text}` (images come before the text in VLMEvalKit's messages)."""
    text = question_prompt(item, kind, dataset)
    if thinking:
        text = with_thinking(text)  # VLMEvalKit appends "\n" + the instruction
    message = [{"type": "image", "value": i} for i in range(len(item.images))] + [{"type": "text", "value": text}]
    return vlmevalkit_prompt(message)


def tiling(n_images: int, dataset: str | None, max_tiles: int | None) -> tuple[int, bool]:
    """(max tiles per image, MSAC) as VLMEvalKit sets them: the per-dataset limit (or `max_tiles`), MSAC for single
    images, and the shared 64-tile budget with several images."""
    max_num = max_tiles if max_tiles is not None else vlmevalkit_max_num(dataset)
    if n_images > 1:
        return multi_image_max_num(max_num, n_images), False
    return max_num, True


def postprocess(prediction: str, dataset: str | None) -> str:
    """ChartQA and OCRVQA predictions lose a trailing '.' (VLMEvalKit)."""
    if dataset and any(s in dataset for s in ("ChartQA", "OCRVQA")):
        return prediction.rstrip(".")
    return prediction
