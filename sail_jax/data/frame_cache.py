"""Training-time video frames: sampled, decoded and resized to one tile, optionally kept in an on-disk cache.

Decoding dominates the cost of a video sample, and every epoch samples the same frames of the same file, so the
cache stores the resized uint8 frames ([N,S,S,3], 16 x 448 x 448 x 3 = 9.6 MB for a default clip) with their frame
indices. An entry is named by a hash of (resolved path, modification time in ns, size in bytes, sampling setting
(num_frames or fps), tile size): those determine the frame indices and pixels, so a changed file or setting misses
and is decoded afresh. Entries are written under a temporary name and renamed into place, so concurrent data
workers and interrupted runs never leave a partial entry; an unreadable entry is a miss and is rewritten. Nothing
evicts entries: the directory grows to (videos x frames x S^2 x 3) bytes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from sail_jax.data.video import VideoFrames, load_video, resize_frames
from sail_jax.files import apply_umask, local_file


def cache_key(path: Path, num_frames: int, fps: float | None, image_size: int) -> str:
    """The entry name of a file's frames under one sampling setting (module docstring); FileNotFoundError names a
    missing file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"video file not found: {path}") from None
    sampling = f"fps={fps!r}" if fps is not None else f"num_frames={num_frames}"
    text = f"{path.resolve()}\0{st.st_mtime_ns}\0{st.st_size}\0{sampling}\0{image_size}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_entry(entry: Path) -> VideoFrames | None:
    try:
        with np.load(entry) as z:
            return VideoFrames(z["frames"], z["indices"], int(z["num_frames_in_file"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write_entry(entry: Path, video: VideoFrames) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, frames=video.frames, indices=video.indices, num_frames_in_file=video.num_frames_in_file)
        apply_umask(tmp)
        os.replace(tmp, entry)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_tile_frames(path: str | os.PathLike, num_frames: int, fps: float | None, image_size: int,
                     cache_dir: str | os.PathLike | None = None) -> VideoFrames:
    """The sampled frames of a video resized to [N,S,S,3] uint8 tiles (`video.load_video` + `resize_frames`),
    from the cache when it holds them. Bad files raise as `load_video` does. PyAV reads local files: a video on a
    URL is read from its local copy (`files.local_file`, fetched once per host)."""
    path = local_file(path, "video file")
    path = Path(path)
    if cache_dir is None:
        video = load_video(path, num_frames, fps)
        return VideoFrames(resize_frames(video.frames, image_size), video.indices, video.num_frames_in_file)
    entry = Path(cache_dir) / f"{cache_key(path, num_frames, fps, image_size)}.npz"
    cached = _read_entry(entry) if entry.is_file() else None
    if cached is not None:
        return cached
    video = load_video(path, num_frames, fps)
    video = VideoFrames(resize_frames(video.frames, image_size), video.indices, video.num_frames_in_file)
    entry.parent.mkdir(parents=True, exist_ok=True)
    _write_entry(entry, video)
    return video
