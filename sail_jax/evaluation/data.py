"""VLMEvalKit benchmark files (TSV) and the prompts VLMEvalKit builds for SAIL-VL2 (its tiling and chat rules).

TSV layout: columns `index`, `image`, `question`, `answer`, optional `hint`, `category` and option columns `A`, `B`, …
An `image` cell holds base64 image data, a list of them for multi-image rows (a JSON / Python list literal, as
VLMEvalKit writes it), or — VLMEvalKit's space saver — the `index` of another row whose image it shares.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sail_jax.data.chat import vlmevalkit_prompt, with_thinking
from sail_jax.data.images import multi_image_max_num, vlmevalkit_max_num

REQUIRED_COLUMNS = ("index", "image", "question", "answer")
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


@dataclass
class Item:
    """One benchmark row: `images` holds base64 strings (decoded lazily), `answers` the acceptable answers."""

    index: str
    row: int  # 1-based data row in the file, for messages
    question: str
    answers: list[str]
    images: list[str]
    options: dict[str, str] = field(default_factory=dict)
    hint: str | None = None
    category: str | None = None
    fields: dict[str, str] = field(default_factory=dict)  # every cell but `image`, in file order (prediction files)


def _where(path: Path, row: int, index: str) -> str:
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


def read_tsv(path: str | Path) -> list[Item]:
    """All rows of a VLMEvalKit TSV; a missing column or an empty required cell names the file, row and column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark file")
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {columns}")
        option_cols = [c for c in string.ascii_uppercase if c in columns]
        raw = list(reader)
    by_index = {r["index"]: r for r in raw}
    items = []
    for n, r in enumerate(raw, start=1):
        where = _where(path, n, r["index"])
        for col in REQUIRED_COLUMNS:
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


def decode_images(item: Item, path: str | Path = "") -> list[Image.Image]:
    """The row's images as RGB PIL images (VLMEvalKit converts to RGB before tiling)."""
    out = []
    for k, data in enumerate(item.images):
        try:
            with Image.open(io.BytesIO(base64.b64decode(data, validate=False))) as im:
                out.append(im.convert("RGB"))
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"{_where(Path(path), item.row, item.index)}: column 'image', image {k}: "
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
