"""Visual packing that saves vision compute: real tiles per second through ViT + adapter + scatter on 8 fake devices,
tile-budgeted (`data.tile_budget`) vs fixed tile slots, measured side by side in one run (a benchmark, not a test).

The sample mix is that of a 4,096-token SFT row with 16 tile slots, 256 tokens per 448-px tile, scaled to this
small ViT (112 px, 16 tokens per tile, rows of 256 tokens: the same image/text token proportions): 20% text-only
samples (log-normal length, some filling a row), 15% with 2-3 images, the rest one image; 1-12 tiles per image.
Samples are packed into rows by the real packer (`pack_rows`), then batched two ways over the same rows:

* fixed slots: `VisualBatchIterDataset` (tile counts balanced over devices); the ViT runs on rows x max_tiles slots;
* budgeted: `BudgetedBatchIterDataset` with the "auto" budget (quantile 0.9 of the balanced per-device loads);
  the ViT runs on devices x budget tiles, rows over the budget wait for the next batch.

Each step is forward + backward of `SailVL.embed` (ViT, pixel-shuffle adapter, scatter into the rows) w.r.t. the
vision and adapter parameters, jitted over 8 CPU devices with the batch sharded on rows. Real tiles/s = real tiles
processed / time, over every batch of one pass, the two paths alternating batch by batch.

    python benchmarks/visual_packing.py [--samples 1200] [--batch 16] [--vit-layers 4]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 " + os.environ.get("XLA_FLAGS", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import grain  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sail_jax.config import PRESETS  # noqa: E402
from sail_jax.data.batch import to_global  # noqa: E402
from sail_jax.data.packing import VisualBatchIterDataset, pack_rows, row_tiles  # noqa: E402
from sail_jax.data.tile_budget import BudgetedBatchIterDataset, auto_budget  # noqa: E402
from sail_jax.models.sail_vl import SailVL  # noqa: E402
from sail_jax.sharding import mesh_from_spec, use_mesh  # noqa: E402
from sail_jax.training.optim import split_groups  # noqa: E402

DEVICES = 8


def model_config(image_size: int, vit_layers: int):
    base = PRESETS["tiny"]
    vision = dataclasses.replace(base.vision, image_size=image_size, num_layers=vit_layers)
    return base.replace(vision=vision, llm=dataclasses.replace(base.llm, vocab_size=1024, num_layers=1),
                        img_context_token_id=1023)


def samples(n: int, seq_len: int, tokens_per_tile: int, context_id: int, seed: int = 0) -> list[dict]:
    """The mix of the module docstring; pixels are 1-px placeholders (the packer only places them)."""
    rng = np.random.default_rng(seed)
    scale = 256 // tokens_per_tile  # text lengths scaled like the tiles' tokens
    out = []
    for i in range(n):
        kind = rng.random()
        images = 0 if kind < 0.2 else (int(rng.integers(2, 4)) if kind < 0.35 else 1)
        tiles = [int(rng.integers(1, 13)) for _ in range(images)]
        text = int(np.clip(rng.lognormal(np.log(300 if images else 1200), 1.0) / scale, 4, seq_len))
        ids = [np.full(t * tokens_per_tile, context_id, np.int32) for t in tiles]
        ids = np.concatenate([*ids, rng.integers(1, 1000, text).astype(np.int32)])[:seq_len]
        if (ids == context_id).sum() != sum(tiles) * tokens_per_tile:  # an image cut by seq_len: drop the sample
            continue
        out.append({"input_ids": ids, "loss_mask": np.ones(len(ids), np.int32),
                    "pixel_values": np.zeros((sum(tiles), 1, 1, 1), np.float32), "info": {"i": i}})
    return out


def real_tiles(batch: dict, side: int, rng: np.random.Generator) -> dict:
    """The batch with placeholder tiles replaced by random real-size tiles (zeros in empty slots)."""
    out = dict(batch)
    if "tile_index" in batch:
        real = batch["tile_index"][..., 0].reshape(-1) >= 0
        pix = np.zeros((real.size, 3, side, side), np.float32)
    else:
        real = batch["tile_mask"]
        pix = np.zeros((*real.shape, 3, side, side), np.float32)
    pix[real] = rng.standard_normal((int(real.sum()), 3, side, side), dtype=np.float32)
    out["pixel_values"] = pix
    return out


def loads(batch: dict) -> np.ndarray:
    if "tile_index" in batch:
        return (batch["tile_index"][..., 0] >= 0).sum(axis=1)
    return batch["tile_mask"].reshape(DEVICES, -1).sum(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1200, help="samples in the pass")
    ap.add_argument("--batch", type=int, default=16, help="rows per batch (over 8 devices)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    ap.add_argument("--max-tiles", type=int, default=16, help="tile slots per row (fixed-slot path)")
    ap.add_argument("--image-size", type=int, default=112, help="tile side in pixels")
    ap.add_argument("--vit-layers", type=int, default=4, help="ViT layers")
    ap.add_argument("--quantile", type=float, default=0.9, help="quantile of balanced loads for the budget")
    ap.add_argument("--max-batches", type=int, default=24, help="timed batches per path (after one warm-up)")
    args = ap.parse_args()

    cfg = model_config(args.image_size, args.vit_layers)
    data = samples(args.samples, args.seq_len, cfg.tokens_per_tile, cfg.img_context_token_id)
    rows_ds = pack_rows(grain.MapDataset.source(data).to_iter_dataset(grain.ReadOptions(num_threads=0)),
                        args.seq_len, args.max_tiles, num_bins=8, seed=0)
    row_loads = [row_tiles(r) for r in rows_ds]
    batches_loads = [row_loads[i:i + args.batch] for i in range(0, len(row_loads) - args.batch + 1, args.batch)]
    budget = auto_budget(batches_loads[:16], DEVICES, args.quantile, args.max_tiles)
    naive = [np.asarray(b).reshape(DEVICES, -1).sum(axis=1) for b in batches_loads]
    fixed = list(VisualBatchIterDataset(rows_ds, args.batch, DEVICES))
    budgeted = list(BudgetedBatchIterDataset(rows_ds, args.batch, DEVICES, budget, args.max_tiles))
    ratio = lambda per_device: np.mean([d.max() / max(d.mean(), 1e-9) for d in per_device])
    print(f"{len(data)} samples -> {len(row_loads)} rows, {sum(row_loads)} tiles, mean {np.mean(row_loads):.1f} "
          f"tiles per row of {args.max_tiles} slots; {args.batch} rows per batch over {DEVICES} devices")
    print(f"per-device tile load max/mean: arrival order {ratio(naive):.3f}, balanced (fixed slots) "
          f"{ratio([loads(b) for b in fixed]):.3f}, budgeted {ratio([loads(b) for b in budgeted]):.3f}")
    print(f"ViT tile slots per device: fixed {args.batch // DEVICES * args.max_tiles}, budget {budget} (auto, "
          f"quantile {args.quantile}); budgeted pass: {len(budgeted)} batches vs {len(fixed)}, rows deferred "
          f"{sum(int(b['deferred_rows']) for b in budgeted)} times (max waiting "
          f"{max(int(b['deferred_rows']) for b in budgeted)}), none dropped")

    mesh = mesh_from_spec({"fsdp": DEVICES})
    model = SailVL(cfg)
    with use_mesh(mesh):
        ids, pix = jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 3, args.image_size, args.image_size))
        params = jax.jit(lambda r: model.init(r, ids, pix))(jax.random.PRNGKey(0))["params"]
        train_p, frozen = split_groups(params, ("vision", "adapter"))

        def loss(tp, b):
            pixels, mask, index = b["pixel_values"], b.get("tile_mask"), b.get("tile_index")
            e = model.apply({"params": {**tp, **frozen}}, b["input_ids"], pixels, mask, tile_index=index,
                            method=SailVL.embed)
            return jnp.mean(jnp.square(e.astype(jnp.float32)))

        step = jax.jit(jax.value_and_grad(loss))
        rng = np.random.default_rng(0)
        totals = {"fixed": [0.0, 0], "budget": [0.0, 0]}
        n = min(args.max_batches, len(fixed) - 1, len(budgeted) - 1)
        for i in range(n + 1):  # batch 0 of each path compiles: not timed
            for name, b in (("fixed", fixed[i]), ("budget", budgeted[i])):
                g = to_global(real_tiles({k: v for k, v in b.items() if k != "deferred_rows"},
                                         args.image_size, rng), mesh, args.batch)
                t0 = time.perf_counter()
                jax.block_until_ready(step(train_p, g))
                if i:
                    totals[name][0] += time.perf_counter() - t0
                    totals[name][1] += int(loads(b).sum())
    rate = {k: tiles / s for k, (s, tiles) in totals.items()}
    print(f"real tiles/s through ViT + adapter + scatter (fwd+bwd, {n} batches each, alternating): fixed slots "
          f"{rate['fixed']:.1f}, budgeted {rate['budget']:.1f} = {rate['budget'] / rate['fixed']:.2f}x "
          f"(goal >= 1.4x); ms per batch {1e3 * totals['fixed'][0] / n:.0f} vs {1e3 * totals['budget'][0] / n:.0f}")


if __name__ == "__main__":
    main()
