"""Small test videos written with PyAV: every frame shows its own index as 8 black/white bars, read back from the
decoded pixels, so a test sees which frame it really got despite compression."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

W, H, BITS = 96, 64, 8


def frame_image(k: int) -> np.ndarray:
    bars = ((k >> np.arange(BITS)[::-1]) & 1).astype(np.uint8) * 255  # most significant bit left
    return np.broadcast_to(np.repeat(bars, W // BITS)[None, :, None], (H, W, 3)).copy()


def read_index(frame: np.ndarray) -> int:
    """The index a frame shows: each bar's centre is white (>127) or black."""
    step = frame.shape[1] // BITS
    bits = [frame[8:-8, b * step + 3:(b + 1) * step - 3].mean() > 127 for b in range(BITS)]
    return int(sum(int(bit) << (BITS - 1 - b) for b, bit in enumerate(bits)))


def write_video(path, n: int, fmt: str | None = None, pts_ms: list[int] | None = None, options=None, rate: int = 30):
    """n frames of libx264 (GOP 8, B-frames on) at `rate` fps, or at the given millisecond timestamps (VFR)."""
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream("libx264", rate=rate, options={"g": "8", "crf": "18"})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for k in range(n):
            frame = av.VideoFrame.from_ndarray(frame_image(k), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[k], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio(container) -> None:
    """A short silent AAC track."""
    stream = container.add_stream("aac", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 8000
    for packet in [*stream.encode(frame), *stream.encode()]:
        container.mux(packet)


def write_bad_videos(directory: Path) -> dict[str, Path]:
    """One file per kind of unusable input: not a video, audio only, missing, a video track without frames, and a
    truncated file (index first, so the cut copy promises more frames than it holds)."""
    text = directory / "notes.mp4"
    text.write_text("not a video at all\n")
    audio = directory / "speech.m4a"
    with av.open(str(audio), "w") as container:
        write_audio(container)
    empty = directory / "empty.mkv"  # only the audio track has packets
    with av.open(str(empty), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        write_audio(container)
    data = write_video(directory / "whole.mp4", 50, options={"movflags": "faststart"}).read_bytes()
    cut = directory / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    return {"not_a_video": text, "audio_only": audio, "missing": directory / "missing.mp4", "zero_frames": empty,
            "truncated": cut}
