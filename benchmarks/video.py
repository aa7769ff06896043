"""Sampled (seeking) video decoding vs decoding every frame (a benchmark, not a test).

Writes a 2-minute 30 fps clip (3600 frames, 320x240 by default: small on purpose, the ratio hardly depends on it;
libx264 preset veryfast with B-frames, one keyframe every `--gop` frames) into a temp dir, then times
1. sampled: `load_video` (the demux index pass plus seeking decode of the 16 frames VLMEvalKit samples), and
2. full: decoding every frame from the start and keeping the same 16, as a reader without seeking must, on one
   thread (as `load_video` decodes) and with FFmpeg's frame+slice threading ("AUTO", the fastest full decode).
Each is the best of `--repeats` runs. Prints frames/s and the time ratios (goal >= 5x at a 2 s GOP).

    python benchmarks/video.py [--gop 60 250] [--size 320x240] [--num-frames 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from sail_jax.data.video import load_video, uniform_frame_indices

SECONDS, RATE = 120, 30


def write_clip(path: Path, width: int, height: int, gop: int) -> Path:
    """A moving diagonal pattern (so frames differ and compress like motion, not like a still)."""
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=RATE, options={"g": str(gop), "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(SECONDS * RATE):
            luma = ((x + y + 4 * k) % 256).astype(np.uint8)
            rgb = np.stack([luma, np.roll(luma, k, axis=1), 255 - luma], axis=-1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_all(path: Path, indices: np.ndarray, thread_type: str) -> np.ndarray:
    """Every frame decoded in order; the wanted ones converted to RGB."""
    wanted, kept = set(indices.tolist()), {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = thread_type
        for k, frame in enumerate(container.decode(stream)):
            if k in wanted:
                kept[k] = frame.to_ndarray(format="rgb24")
    return np.stack([kept[i] for i in indices.tolist()])


def best_times(repeats: int, runs: dict) -> dict[str, tuple[float, np.ndarray]]:
    """Best wall time and result of each named (fn, *args); the runs are interleaved so that load on a shared
    machine hits them alike."""
    best = {name: (float("inf"), None) for name in runs}
    for _ in range(repeats):
        for name, (fn, *fn_args) in runs.items():
            start = time.perf_counter()
            out = fn(*fn_args)
            best[name] = min(best[name], (time.perf_counter() - start, out), key=lambda t: t[0])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gop", type=int, nargs="+", default=[60, 250], help="keyframe intervals to try (frames)")
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    total = SECONDS * RATE
    with tempfile.TemporaryDirectory() as tmp:
        for gop in args.gop:
            path = write_clip(Path(tmp) / f"clip_gop{gop}.mp4", width, height, gop)
            indices = uniform_frame_indices(total, args.num_frames)
            best = best_times(args.repeats, {
                "sampled": (load_video, path, args.num_frames),
                "NONE": (decode_all, path, indices, "NONE"),
                "AUTO": (decode_all, path, indices, "AUTO"),
            })
            t_seek, sampled = best["sampled"]
            print(f"{SECONDS} s {RATE} fps {width}x{height} libx264 GOP {gop} ({gop / RATE:.1f} s), "
                  f"{args.num_frames} frames sampled of {total}, best of {args.repeats}:")
            print(f"  sampled (index pass + seek), 1 thread : {t_seek * 1000:7.1f} ms "
                  f"{args.num_frames / t_seek:6.1f} sampled frames/s")
            for threads, label in (("NONE", "1 thread"), ("AUTO", "threads AUTO")):
                t_full, full = best[threads]
                if not np.array_equal(sampled.frames, full):
                    raise SystemExit(f"GOP {gop}: the seeking decoder returned other frames than the full decode")
                print(f"  full decode of every frame, {label:12}: {t_full * 1000:7.1f} ms "
                      f"{args.num_frames / t_full:6.1f} sampled frames/s ({total / t_full:.0f} decoded frames/s), "
                      f"sampled is {t_full / t_seek:.1f}x faster")


if __name__ == "__main__":
    main()
