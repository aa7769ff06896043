"""`curate dedup`: keep the first record of each (image content, normalised question) key.

Images are compared by the SHA-256 of their file bytes (the same picture under two paths is one image), hashed once
per path; a record's image key is the tuple of its images' hashes in order, and a text-only record dedups on its
question alone. The question is every user turn, as word tokens (case, punctuation, spacing and `<image>` markers
ignored). Memory holds one 16-byte digest per distinct key and one hash per distinct image path; a record whose image
file is missing is a bad line (reason `missing_image`, as for the loader).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sail_jax.curation.stream import Curation, Record, Report
from sail_jax.curation.text import words

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def normalised_question(record: Record) -> str:
    """The record's user turns as normalised words, turns separated by newlines."""
    return "\n".join(" ".join(words(m["content"])) for m in record.conversation.messages if m["role"] == "user")


class ImageHashes:
    """SHA-256 of image files, computed once per path."""

    def __init__(self):
        self._by_path: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        if path not in self._by_path:
            self._by_path[path] = file_sha256(path)
        return self._by_path[path]

    def __len__(self) -> int:
        return len(self._by_path)


def dedup_key(record: Record, hashes: ImageHashes) -> bytes:
    """16-byte digest of (image hashes, normalised question); raises FileNotFoundError for a missing image."""
    images = [hashes(p) for p in record.conversation.images]
    key = "\0".join([*images, "", normalised_question(record)])
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def dedup_file(src: str | os.PathLike, out: str | os.PathLike, report: str | os.PathLike,
               image_root: str | os.PathLike | None = None, max_bad_fraction: float = 0.05) -> Report:
    """Write the first record of each key of `src` to `out`; image paths are relative to `image_root` (default:
    the file's directory)."""
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"--image-root {image_root}: not a directory")
    params = {"image_root": str(image_root if image_root is not None else Path(src).parent)}
    hashes, seen = ImageHashes(), set()
    with Curation("dedup", src, out, report, params, image_root, max_bad_fraction) as run:
        for record in run.records():
            try:
                key = dedup_key(record, hashes)
            except OSError as e:
                run.bad(record, "missing_image", f"image {e.filename}: {e.strerror}")
                continue
            if key in seen:
                run.drop("duplicate")
            else:
                seen.add(key)
                run.keep(record.obj)
        run.report.stats = {"distinct_keys": len(seen), "images_hashed": len(hashes)}
    return run.report
