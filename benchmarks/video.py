"""Sampled (seeking) video decoding vs decoding every frame (a benchmark, not a test).

Writes a 2-minute 30 fps clip (3600 frames, 320x240 by default: small on purpose, the ratio hardly depends on it;
libx264 preset veryfast with B-frames, one keyframe every `--gop` frames) into a temp dir, then times
1. sampled: `load_video` (the demux index pass plus seeking decode of the 16 frames VLMEvalKit samples), and
2. full: decoding every frame from the start and keeping the same 16, as a reader without seeking must, on one
   thread (as `load_video` decodes) and with FFmpeg's frame+slice threading ("AUTO", the fastest full decode).
Each is the best of `--repeats` runs. Prints frames/s and the time ratios (goal >= 5x at a 2 s GOP).

With `--loader`: whether the training data loader keeps up with the tiny model's training step on video samples.
`--clips` 10-second 30 fps clips (640x360) behind 64 LLaVA-Video records; the full pipeline (`grain_data`: decode 16
frames, 448-px tiles, tokenization, packing, batching) at one video per 4,608-token row, 2 rows per batch, timed
over `--batches` batches with `--workers` worker processes, first without a frame cache, then with a warm one; and
the tiny preset's jitted training step (adapter + LLM trained) on one of those batches. The loader keeps up when its
samples/s is at least the step's steps/s x samples per batch.

    python benchmarks/video.py [--gop 60 250] [--size 320x240] [--num-frames 16] [--repeats 5]
    python benchmarks/video.py --loader [--clips 4] [--batches 8] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from sail_jax.data.video import load_video, uniform_frame_indices

SECONDS, RATE = 120, 30
BATCH_ROWS, LOADER_SEQ = 2, 4608  # one 16-frame video (16 x 258 tokens + text) per row


def write_clip(path: Path, width: int, height: int, gop: int, seconds: int = SECONDS) -> Path:
    """A moving diagonal pattern (so frames differ and compress like motion, not like a still)."""
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=RATE, options={"g": str(gop), "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(seconds * RATE):
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


def loader_samples_per_s(records: Path, tokenizer: Path, num_frames: int, workers: int, batches: int,
                         cache: Path | None) -> tuple[float, dict]:
    """Samples/s of the pipeline over `batches` batches after a first one (start-up, worker spawn), and a batch."""
    from sail_jax.config import get_preset
    from sail_jax.data.pipeline import grain_data

    it = grain_data(cfg=get_preset("tiny"), global_batch_size=BATCH_ROWS, seq_len=LOADER_SEQ, process_index=0,
                    process_count=1, seed=0, datasets=[{"path": str(records), "num_frames": num_frames}],
                    tokenizer_dir=str(tokenizer), max_tiles=num_frames, num_workers=workers, num_packing_bins=2,
                    frame_cache_dir=None if cache is None else str(cache))
    batch = next(it)
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += int(next(it)["segment_ids"].max(axis=1).sum())
    return samples / (time.perf_counter() - start), batch


def step_time(batch: dict, repeats: int = 3) -> float:
    """Best seconds per jitted training step of the tiny preset on `batch` (compiled first)."""
    import jax

    from sail_jax.config import get_preset
    from sail_jax.data.batch import to_global
    from sail_jax.sharding import use_mesh
    from sail_jax.training.program import build_program
    from sail_jax.training.step import TrainState

    program = build_program(model=get_preset("tiny"), batch_size=BATCH_ROWS, seq_len=LOADER_SEQ, steps=10,
                            trainable=("adapter", "llm"), mesh={"fsdp": 1}, target_fraction=0.1,
                            devices=jax.devices()[:1])
    with use_mesh(program.mesh):
        params = program.init_params(jax.random.PRNGKey(0))
        state = TrainState(params, program.init_opt_state(params))
        best = float("inf")
        for k in range(repeats + 1):
            start = time.perf_counter()
            state, metrics = program.step(state, to_global(batch, program.mesh, BATCH_ROWS), np.int32(k),
                                          np.float32(1.0))
            jax.block_until_ready(metrics["loss"])
            if k:  # the first call compiles
                best = min(best, time.perf_counter() - start)
    return best


def loader_benchmark(args: argparse.Namespace) -> None:
    from sail_jax.resources import TOKENIZER_DIR

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in range(args.clips):
            write_clip(tmp / f"clip{k}.mp4", 640, 360, 60, seconds=10)
        records = tmp / "videos.jsonl"
        records.write_text("".join(json.dumps({"video": f"clip{k % args.clips}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat moves in this video?"},
            {"from": "gpt", "value": "A diagonal pattern moves to the right."}]}) + "\n" for k in range(64)))
        batch = None
        print(f"loader: {args.num_frames} frames per video (448-px tiles), {BATCH_ROWS} rows x {LOADER_SEQ} tokens per "
              f"batch, {args.batches} batches, {args.clips} clips of 10 s 640x360:")
        for workers in args.workers:
            cold, batch = loader_samples_per_s(records, TOKENIZER_DIR, args.num_frames, workers, args.batches, None)
            cache = tmp / f"cache{workers}"
            loader_samples_per_s(records, TOKENIZER_DIR, args.num_frames, workers, args.batches, cache)  # fill it
            warm, _ = loader_samples_per_s(records, TOKENIZER_DIR, args.num_frames, workers, args.batches, cache)
            print(f"  {workers} worker(s): {cold:6.2f} samples/s decoding, {warm:6.2f} samples/s from the frame cache")
        per_batch = int(batch["segment_ids"].max(axis=1).sum())
        t = step_time(batch)
        print(f"tiny training step (one device): {t * 1000:.0f} ms = {1 / t:.2f} steps/s x {per_batch} samples "
              f"per batch = {per_batch / t:.2f} samples/s needed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gop", type=int, nargs="+", default=[60, 250], help="keyframe intervals to try (frames)")
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loader", action="store_true", help="the data-loader vs training-step comparison instead")
    parser.add_argument("--clips", type=int, default=4, help="--loader: distinct clips behind the 64 records")
    parser.add_argument("--batches", type=int, default=8, help="--loader: batches timed")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="--loader: worker processes to try")
    args = parser.parse_args()
    if args.loader:
        loader_benchmark(args)
        return
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
