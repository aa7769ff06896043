"""Packing efficiency and loader throughput of the data pipeline (a benchmark, not a test).

1. Packing: a realistic length mix (log-normal text lengths, 20% text-only, otherwise one image of 1–11 tiles at 256
   tokens each) with synthetic token ids, packed by Grain best-fit with the tile budget (sail_jax.data.packing).
   Reports the real-token fraction with packing vs padding every sample to seq_len, and vs padding to the longest
   sample of each batch; plus tiles per device (max/mean) in naive vs visual-packing order.
2. Loader: samples/s of the full pipeline (PNG decode, 448-px tiling, tokenization, packing, batching) on the demo
   images (1–4 tiles) with 0 and 2 worker processes.

    python benchmarks/packing.py [--samples 4000] [--seq-len 16384] [--max-tiles 64] [--no-loader]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import grain
import numpy as np

from sail_jax.data.packing import VisualBatchIterDataset, batch_stats, pack_rows
from sail_jax.data.pipeline import DataConfig, DatasetSpec, build_dataset
from sail_jax.evaluation.demo import make_demo_data

TOKENS_PER_TILE = 256
REPO = Path(__file__).resolve().parents[1]


def synthetic_samples(n: int, seq_len: int, max_tiles: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tiles = 0 if rng.random() < 0.2 else int(rng.integers(1, 12))
        text = int(np.clip(rng.lognormal(np.log(300), 1.0), 16, 8000))
        length = min(seq_len, text + tiles * (TOKENS_PER_TILE + 2))
        out.append({"input_ids": rng.integers(0, 150000, length).astype(np.int32),
                    "loss_mask": np.ones(length, np.int32),
                    "pixel_values": np.zeros((min(tiles, max_tiles), 3, 1, 1), np.float32), "info": {}})
    return out


def packing_figures(args: argparse.Namespace) -> None:
    samples = synthetic_samples(args.samples, args.seq_len, args.max_tiles)
    lengths = np.array([len(s["input_ids"]) for s in samples])
    ds = grain.MapDataset.source(samples).to_iter_dataset(grain.ReadOptions(num_threads=0))
    start = time.perf_counter()
    rows = pack_rows(ds, args.seq_len, args.max_tiles, args.bins, seed=0)
    ratios = {}
    fractions = []
    for devices in (1, args.devices):
        batches = list(VisualBatchIterDataset(rows, args.batch, devices))
        ratios[devices] = np.mean([batch_stats(b, args.devices)["tile_balance"] for b in batches])
        fractions = [batch_stats(b)["real_token_fraction"] for b in batches]
    elapsed = time.perf_counter() - start
    packed = np.mean(fractions[:-1])  # the last batch is partial (end of the stream)
    longest = np.mean([lengths[i:i + args.batch].mean() / lengths[i:i + args.batch].max()
                       for i in range(0, len(lengths) - args.batch + 1, args.batch)])
    print(f"packing: {args.samples} samples, mean {lengths.mean():.0f} tokens, seq_len {args.seq_len}, "
          f"max_tiles {args.max_tiles}, best-fit over {args.bins} bins, batch {args.batch}")
    print(f"  real-token fraction: packed {packed:.1%} | pad to seq_len {lengths.mean() / args.seq_len:.1%} | "
          f"pad to the batch's longest {longest:.1%}")
    print(f"  tiles per device max/mean over {args.devices} devices: naive order {ratios[1]:.3f} | "
          f"visual packing {ratios[args.devices]:.3f}   (packing + batching twice: {elapsed:.1f} s)")


def loader_figures(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_data(tmp, n=args.loader_samples, seed=0, n_heldout=1)
        for workers in (0, 2):
            cfg = DataConfig(datasets=(DatasetSpec(str(Path(tmp) / "train.jsonl")),),
                             tokenizer_dir=str(REPO / "assets" / "tokenizer"), seq_len=4096, batch_size=4,
                             max_tiles=16, num_devices=1, num_workers=workers)
            it = iter(build_dataset(cfg, 0, 1))
            t0 = time.perf_counter()
            first = next(it)
            t1 = time.perf_counter()
            n = 0
            for _ in range(args.loader_batches):
                n += int(next(it)["segment_ids"].max(axis=1).sum())
            t2 = time.perf_counter()
            it.close()
            print(f"loader, {workers} workers: first batch {t1 - t0:.1f} s, then {n / (t2 - t1):.1f} samples/s "
                  f"({n} samples in {args.loader_batches} batches of 4x4096 tokens; "
                  f"{int(first['tile_mask'].sum())} tiles in the first batch)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--max-tiles", type=int, default=64)
    p.add_argument("--bins", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--loader-samples", type=int, default=300)
    p.add_argument("--loader-batches", type=int, default=12)
    p.add_argument("--no-loader", action="store_true", help="packing figures only")
    args = p.parse_args()
    packing_figures(args)
    if not args.no_loader:
        loader_figures(args)


if __name__ == "__main__":
    main()
