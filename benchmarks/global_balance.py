"""Visual packing balanced per data shard vs over all shards' devices (`data.global_balance`), on data shards whose
tile mixes differ (a benchmark of the placement, not of the ViT: the ViT's cost per step is fixed by the budget, so
what global placement changes is how full the budget slots are and how many rows wait).

Shards (rows of 256 tokens and 16 tile slots, 16 tokens per tile: the scaled SFT row of benchmarks/visual_packing.py):
shard 0 heavy (every sample one image of 6-12 tiles), shard 1 the visual_packing mix (20% text-only, 15% with 2-3
images, 1-12 tiles each), shards 2.. light (70% text-only, images of 1-4 tiles). Each shard's samples are packed by
the real packer into an endless row stream; each step takes 16 rows per shard over 4 devices per shard with the
tile budget chosen like "auto" (quantile 0.9 of the balanced per-device loads) from all shards' rows pooled. Per step:
real tiles placed, budget fill (tiles / (devices x budget)), per-device load max/mean, rows placed, rows waiting,
placement time.

`--anyres`: the same shard kinds as SAIL-ViT-AnyRes rows (512 tokens, 1024 patch slots, no budget; heavy: one image
of 256-1024 patches, mixed: 20% text-only, else 1-3 images of 16-400 patches, light: 70% text-only, else one of
16-128), balanced per shard (`VisualBatchIterDataset`) vs over all shards' devices (`keep_slots`): per-device patch
load max/mean and placement time.

    python benchmarks/global_balance.py [--shards 4] [--steps 60] [--max-migrants 4] [--anyres]
"""

from __future__ import annotations

import argparse
import time

import grain
import numpy as np

from sail_jax.config import VisionConfig
from sail_jax.data.elastic import ShardedIterator
from sail_jax.data.global_balance import GlobalBudgetedIterator
from sail_jax.data.packing import VisualBatchIterDataset, pack_rows, row_tiles
from sail_jax.data.tile_budget import BudgetedBatchIterator, auto_budget

SEQ, SLOTS, TOKENS, ROWS, DEVICES = 256, 16, 16, 16, 4


def shard_samples(kind: str, n: int, seed: int) -> list[dict]:
    """A shard's samples (pixels are 1-px placeholders: the placement only counts tiles)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        u = rng.random()
        if kind == "heavy":
            tiles = [int(rng.integers(6, 13))]
        elif kind == "mixed":
            tiles = [] if u < 0.2 else [int(rng.integers(1, 13)) for _ in range(int(rng.integers(2, 4)) if u < 0.35
                                                                              else 1)]
        else:
            tiles = [] if u < 0.7 else [int(rng.integers(1, 5))]
        text = int(np.clip(rng.lognormal(np.log(300 if tiles else 1200), 1.0) / 16, 4, SEQ))
        ids = np.concatenate([np.full(sum(tiles) * TOKENS, 7, np.int32), rng.integers(8, 1000, text).astype(np.int32)])
        if len(ids) > SEQ or sum(tiles) > SLOTS:
            continue
        out.append({"input_ids": ids, "loss_mask": np.ones(len(ids), np.int32),
                    "pixel_values": np.zeros((sum(tiles), 1, 1, 1), np.float32), "info": {"i": i}})
    return out


def row_stream(samples: list[dict], seed: int) -> grain.IterDataset:
    ds = grain.MapDataset.source(samples).repeat(None).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return pack_rows(ds, SEQ, SLOTS, num_bins=16, seed=seed)


def budgeted(samples: list[list[dict]], budget: int, mode: str, max_migrants: int) -> ShardedIterator:
    its = {v: BudgetedBatchIterator(iter(row_stream(s, v)), ROWS, DEVICES, budget, 0) for v, s in enumerate(samples)}
    shards = range(len(samples))
    if mode == "global":
        return GlobalBudgetedIterator(lambda v: its[v], its, shards, len(samples), ROWS, DEVICES, budget, max_migrants)
    return ShardedIterator(lambda v: its[v], shards, len(samples))


def measure(it: ShardedIterator, steps: int, budget: int) -> dict[str, float]:
    tiles, fill, ratio, rows, waiting, ms = [], [], [], [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = next(it)
        ms.append(1e3 * (time.perf_counter() - t0))
        per_device = (b["tile_index"][..., 0] >= 0).sum(axis=1)
        tiles.append(per_device.sum())
        fill.append(per_device.sum() / (len(per_device) * budget))
        ratio.append(per_device.max() / max(per_device.mean(), 1e-9))
        rows.append((b["segment_ids"] > 0).any(axis=1).sum())
        waiting.append(int(b["deferred_rows"]))
    return {"tiles/step": np.mean(tiles), "fill": np.mean(fill), "max/mean": np.mean(ratio),
            "rows/step": np.mean(rows), "waiting/step": np.mean(waiting), "ms/step": np.median(ms)}


ANYRES_SEQ, PATCHES = 512, 1024
ANYRES = VisionConfig(patch_size=1, num_channels=1, anyres=True, max_anyres_patches=PATCHES)  # 1-value patches


def anyres_samples(kind: str, n: int, seed: int) -> list[dict]:
    """A shard's AnyRes samples: images as (h, w) patch grids (even sides), patches/4 LLM tokens each."""
    rng = np.random.default_rng(seed)
    lo, hi, count = {"heavy": (256, 1024, lambda u: 1), "mixed": (16, 400, lambda u: 0 if u < 0.2 else
                                                                   int(rng.integers(1, 4))),
                     "light": (16, 128, lambda u: 0 if u < 0.7 else 1)}[kind]
    out = []
    for i in range(n):
        grids = []
        for _ in range(count(rng.random())):
            h = 2 * int(rng.integers(1, 17))
            grids.append((h, 2 * max(1, int(rng.integers(lo, hi + 1)) // (2 * h))))
        patches = sum(h * w for h, w in grids)
        text = int(np.clip(rng.lognormal(np.log(300 if grids else 1200), 1.0) / 16, 4, ANYRES_SEQ))
        ids = np.concatenate([np.full(patches // 4, 7, np.int32), rng.integers(8, 1000, text).astype(np.int32)])
        if len(ids) > ANYRES_SEQ or patches > PATCHES:
            continue
        out.append({"input_ids": ids, "loss_mask": np.ones(len(ids), np.int32),
                    "anyres_patches": np.zeros((patches, 1), np.float32),
                    "anyres_grids": np.asarray(grids, np.int64).reshape(-1, 2), "info": {"i": i}})
    return out


def anyres_balance(samples: list[list[dict]], mode: str, max_migrants: int, steps: int) -> dict[str, float]:
    """Per-device patch load max/mean (mean over steps) and placement time of AnyRes rows placed `mode`-wise."""
    streams = [pack_rows(grain.MapDataset.source(s).repeat(None).to_iter_dataset(grain.ReadOptions(num_threads=0)),
                         ANYRES_SEQ, 1, num_bins=16, seed=v, max_patches=PATCHES) for v, s in enumerate(samples)]
    shards = range(len(samples))
    if mode == "global":
        its = {v: BudgetedBatchIterator(iter(streams[v]), ROWS, DEVICES, ROWS // DEVICES * PATCHES, 0,
                                        keep_slots=True, anyres=ANYRES) for v in shards}
        it = GlobalBudgetedIterator(lambda v: its[v], its, shards, len(samples), ROWS, DEVICES,
                                    ROWS // DEVICES * PATCHES, max_migrants, slack=PATCHES // 8)
    else:
        it = ShardedIterator(lambda v: iter(VisualBatchIterDataset(streams[v], ROWS, DEVICES, 0, ANYRES)), shards,
                             len(samples))
    ratio, patches, ms = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = next(it)
        ms.append(1e3 * (time.perf_counter() - t0))
        per_device = (b["anyres_segment_ids"] > 0).reshape(len(samples) * DEVICES, -1).sum(axis=1)
        ratio.append(per_device.max() / max(per_device.mean(), 1e-9))
        patches.append(per_device.sum())
    return {"patches/step": np.mean(patches), "max/mean": np.mean(ratio), "ms/step": np.median(ms)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--max-migrants", type=int, default=ROWS // 4)
    p.add_argument("--samples", type=int, default=3000, help="samples per shard (streams repeat)")
    p.add_argument("--anyres", action="store_true", help="AnyRes patch rows without a budget (module docstring)")
    a = p.parse_args()
    kinds = ["heavy", "mixed", *["light"] * (a.shards - 2)]
    if a.anyres:
        samples = [anyres_samples(k, a.samples, v) for v, k in enumerate(kinds)]
        print(f"AnyRes: {a.shards} shards ({', '.join(kinds)}) x {DEVICES} devices x {ROWS} rows of {PATCHES} patch "
              f"slots, max_migrants {a.max_migrants}, {a.steps} steps")
        for mode in ("process", "global"):
            m = anyres_balance(samples, mode, a.max_migrants, a.steps)
            print(f"{mode:8s}" + "  ".join(f"{k} {v:.3g}" for k, v in m.items()))
        return
    samples = [shard_samples(k, a.samples, v) for v, k in enumerate(kinds)]
    loads = [[row_tiles(r) for _, r in zip(range(16 * ROWS), iter(row_stream(s, v)))] for v, s in enumerate(samples)]
    batches = [[x for shard in loads for x in shard[i:i + ROWS]] for i in range(0, 16 * ROWS, ROWS)]
    budget = auto_budget(batches, DEVICES * a.shards, 0.9, SLOTS)
    print(f"{a.shards} shards ({', '.join(kinds)}) x {DEVICES} devices x {ROWS} rows, tile budget {budget} per device "
          f"(auto, pooled), max_migrants {a.max_migrants}, {a.steps} steps")
    for mode in ("process", "global"):
        m = measure(budgeted(samples, budget, mode, a.max_migrants), a.steps, budget)
        print(f"{mode:8s}" + "  ".join(f"{k} {v:.3g}" for k, v in m.items()))


if __name__ == "__main__":
    main()
