"""Visual packing balanced over all data shards' devices (`data.global_balance`): the placement on its own, the
coordinator over 2 skewed data shards in one process (fewer deferred rows than per-shard balancing, every sample
once, exact restore, no migration = per-shard), and 2 processes giving the global batches of one (and training)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from sail_jax.data.batch import BUDGET_KEYS
from sail_jax.data.elastic import ShardedIterator
from sail_jax.data.global_balance import GlobalBudgetedIterator, assign_global
from sail_jax.data.packing import VisualBatchIterDataset, pack_rows
from sail_jax.data.pipeline import grain_data
from sail_jax.data.tile_budget import BudgetedBatchIterator, BudgetedBatchIterDataset, assign_rows
from tests.test_anyres_training import CFG as ANYRES_CFG
from tests.test_tile_budget import CFG, rows, sample, seen_samples

REPO = Path(__file__).resolve().parents[1]


def check(loads, device, n, per_device, budget, max_migrants=None) -> tuple[int, int]:
    """Assert the row-slot, budget and migrant limits; (deferred rows, placed load)."""
    g = np.concatenate(device)
    flat = np.concatenate([np.asarray(x) for x in loads])
    home = np.repeat(np.arange(len(loads)), [len(x) for x in loads])
    on = g >= 0
    assert (np.bincount(g[on], minlength=len(loads) * n) <= per_device).all()
    assert (np.bincount(g[on], weights=flat[on], minlength=len(loads) * n) <= budget).all()
    if max_migrants is not None:
        assert (np.bincount(home[on & (g // n != home)], minlength=len(loads)) <= max_migrants).all()
    return int((~on).sum()), int(flat[on].sum())


def test_assign_global_places_skewed_shards_better_than_per_shard_and_is_per_shard_with_one():
    rng = np.random.default_rng(0)
    for _ in range(20):
        heavy, light = rng.integers(4, 9, 8), rng.integers(0, 3, 5)  # shard 0 heavy, shard 1 light
        device = assign_global([heavy, light], n_devices=2, rows_per_device=4, budget=12, max_migrants=3)
        alone = [assign_rows(x, 2, 4, 12) for x in (heavy, light)]
        _, load = check([heavy, light], device, 2, 4, 12, max_migrants=3)
        assert load > sum(int(x[a >= 0].sum()) for x, a in zip((heavy, light), alone))  # fuller budgets
        loads = rng.integers(0, 9, 7)
        np.testing.assert_array_equal(assign_global([loads], 3, 2, 10, ordered=[2])[0],
                                      assign_rows(loads, 3, 2, 10, ordered=2))
        alone = assign_global([heavy, light], 2, 4, 12, max_migrants=0)  # no migration: each shard on its own
        for x, d, v in zip((heavy, light), alone, (0, 1)):
            want = assign_rows(x, 2, 4, 12)
            np.testing.assert_array_equal(d, np.where(want < 0, -1, want + 2 * v))
    # carried-over rows go first, taken in turn from each shard (oldest first), here filling the 4 devices
    got = assign_global([[5, 5, 5], [5, 5], [], []], 1, 1, 5, ordered=[3, 2, 0, 0])
    assert [list(d) for d in got] == [[0, 2, -1], [1, 3], [], []]
    # a light shard's empty devices take the heavy shard's rows its own devices cannot
    assert [list(d) for d in assign_global([[6, 6, 6, 6], []], 2, 2, 6)] == [[0, 1, 2, 3], []]


def skewed(n: int) -> tuple[list[dict], list[dict]]:
    """Shard 0: rows of 6 tiles (one per device fills the budget); shard 1: text-only rows (numbered apart)."""
    return [sample(i, 30, 6) for i in range(n)], [sample(100 + i, 30, 0) for i in range(n)]


def coordinator(shards: tuple[list[dict], list[dict]], max_migrants: int = 2) -> GlobalBudgetedIterator:
    its = {v: BudgetedBatchIterator(iter(rows(s)), 4, 2, 6, 0) for v, s in enumerate(shards)}
    return GlobalBudgetedIterator(lambda v: its[v], its, range(2), 2, shard_rows=4, n_devices=2, budget=6,
                                  max_migrants=max_migrants)


def per_shard(shards: tuple[list[dict], list[dict]]) -> ShardedIterator:
    return ShardedIterator(lambda v: iter(BudgetedBatchIterDataset(rows(shards[v]), 4, 2, 6, 6)), range(2), 2)


def tiles(batches: list[dict]) -> list[int]:
    return [int((b["tile_index"][..., 0] >= 0).sum()) for b in batches]


def deferred(batches: list[dict], steps: int) -> int:
    return sum(int(b["deferred_rows"]) for b in batches[:steps])


def test_two_skewed_shards_defer_fewer_rows_see_every_sample_once_and_restore():
    data = skewed(24)
    batches = list(coordinator(data))
    seen = [i for b in batches for i in seen_samples(b, 4)]
    assert sorted(seen) == list(range(24)) + list(range(100, 124))  # nothing dropped, nothing twice
    process = list(per_shard(data))
    assert deferred(batches, 5) < deferred(process, 5), (deferred(batches, 5), deferred(process, 5))
    assert tiles(batches[:5]) == [24] * 5 and tiles(process[:5]) == [12] * 5  # 4 heavy rows a step, not 2
    one = list(coordinator(data, max_migrants=1))  # 3 heavy rows a step: rows wait
    assert sorted(i for b in one for i in seen_samples(b, 4)) == sorted(seen)
    it = coordinator(data, max_migrants=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    assert state["shards"]["0"]["waiting"], "the test needs rows waiting at the checkpoint"
    again = coordinator(data, max_migrants=1)
    again.set_state(json.loads(json.dumps(state)))
    for a, b in zip(one[3:], list(again), strict=True):
        for k in (*BUDGET_KEYS, "deferred_rows"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for a, b in zip(list(coordinator(data, max_migrants=0))[:4], process[:4]):  # no migration: per shard
        for k in (*BUDGET_KEYS, "deferred_rows"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def skewed_jsonl(out: Path, n: int) -> Path:
    """n records: even ones with a 3:2 image (6 tiles + thumbnail at 56 px), odd ones text only; unshuffled, data
    shard 0 of 2 reads all the image records."""
    out.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (168, 112), (200, 30, 30)).save(out / "wide.png")
    with (out / "train.jsonl").open("w") as f:
        for i in range(n):
            ask = {"from": "human", "value": ("<image>\n" if i % 2 == 0 else "") + f"Question {i}?"}
            record = {"id": f"r{i}", "conversations": [ask, {"from": "gpt", "value": f"answer {i}"}]}
            if i % 2 == 0:
                record["image"] = "wide.png"
            f.write(json.dumps(record) + "\n")
    return out / "train.jsonl"


def factory_options(path: Path, data_dir: Path, balance: str) -> dict:
    return dict(datasets=[{"path": str(path)}], tokenizer_dir=str(data_dir / "tokenizer"), data_shards=2,
                num_devices=4, max_tiles=8, max_num=6, tile_budget=8, tile_balance=balance, max_migrants=2,
                shuffle=False, num_workers=0, num_packing_bins=2, prefetch_batches=1)


def factory(path: Path, data_dir: Path, balance: str):
    return grain_data(cfg=CFG, global_batch_size=16, seq_len=96, process_index=0, process_count=1, seed=0,
                      **factory_options(path, data_dir, balance))


def global_batches(path: Path, data_dir: Path, balance: str, steps: int) -> list[dict]:
    it = factory(path, data_dir, balance)
    return [next(it) for _ in range(steps)]


def test_two_processes_build_the_global_batches_of_one_and_train(data_dir, tmp_path):
    path = skewed_jsonl(tmp_path / "data", 64)
    it = factory(path, data_dir, "global")
    one = [next(it)]
    state = json.loads(json.dumps(it.get_state()))
    assert state["shards"]["0"]["data_config"]["tile_balance"] == "global"
    one += [next(it), next(it)]
    again = factory(path, data_dir, "global")
    again.set_state(state)  # the Grain factory's checkpoint: the same following batches
    for a, b in zip(one[1:], [next(again), next(again)]):
        for k in (*BUDGET_KEYS, "deferred_rows"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert tiles(one) == [6 * 7] * 3 and tiles(global_batches(path, data_dir, "process", 3)) == [4 * 7] * 3
    two_processes(factory_options(path, data_dir, "global"), tmp_path / "out", "tiles", one)


def two_processes(options: dict, out: Path, model: str, want: list[dict]) -> None:
    """Run tests/global_balance_driver.py as 2 processes x 4 CPU devices; their batches must join into `want` (each
    process's `deferred_rows` the run's count), and their training step must give a finite loss."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "global_balance_driver.py"), f"localhost:{port}",
                               str(i), str(out), json.dumps(options), model], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    for step, batch in enumerate(want):
        got = [np.load(out / f"p{i}-{step}.npz") for i in range(2)]
        for k in batch:
            if k != "deferred_rows":
                np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), batch[k], err_msg=f"{step} {k}")
        assert [int(g["deferred_rows"]) for g in got] == [int(batch["deferred_rows"])] * 2  # the run's, on each
    m = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert m and all(np.isfinite(r["loss"]) for r in m), m


def test_two_processes_balance_anyres_patches_like_one(data_dir, tmp_path):
    path = skewed_jsonl(tmp_path / "data", 64)
    options = {**factory_options(path, data_dir, "global"), "tile_budget": None, "max_patches": 128,
               "max_migrants": 4}
    it = grain_data(cfg=ANYRES_CFG, global_batch_size=16, seq_len=96, process_index=0, process_count=1, seed=0,
                    **options)
    one = [next(it) for _ in range(3)]
    assert balance(one, "anyres_segment_ids", 8) == 1.0
    two_processes(options, tmp_path / "out", "anyres", one)


def test_global_deferred_count_is_every_shards_waiting_rows():
    data = skewed(24)
    its = {v: BudgetedBatchIterator(iter(rows(s)), 4, 2, 6, 0) for v, s in enumerate(data)}
    it = GlobalBudgetedIterator(lambda v: its[v], its, range(2), 2, shard_rows=4, n_devices=2, budget=6,
                                max_migrants=1)
    counts = []
    for b in it:
        counts.append(int(b["deferred_rows"]))
        assert counts[-1] == sum(len(x.waiting) for x in its.values())
    assert max(counts) > 0 and counts[-1] == 0


ANYRES = ANYRES_CFG.vision
PATCHES = 64  # patch slots per AnyRes row
DIM = ANYRES.patch_size ** 2 * ANYRES.num_channels


def anyres_sample(i: int, grids: list[tuple[int, int]]) -> dict:
    """30 tokens (encoding the sample) and images of `grids` patches whose values are the sample's number."""
    patches = sum(h * w for h, w in grids)
    return {"input_ids": (1000 * (i + 1) + np.arange(30)).astype(np.int32), "loss_mask": np.ones(30, np.int32),
            "anyres_patches": np.full((patches, DIM), i + 1, np.float32),
            "anyres_grids": np.asarray(grids, np.int64).reshape(-1, 2), "info": {"dataset": 0, "where": f"f:{i}"}}


def anyres_rows(samples: list[dict]) -> grain.IterDataset:
    return pack_rows(grain.MapDataset.source(samples).to_iter_dataset(grain.ReadOptions(num_threads=0)), 32, 1,
                     num_bins=2, seed=0, max_patches=PATCHES)


def anyres_skewed(n: int) -> tuple[list[dict], list[dict]]:
    """Shard 0: one image of 32-64 patches per sample; shard 1: text only (one sample per row)."""
    rng = np.random.default_rng(0)
    heavy = [anyres_sample(i, [(int(rng.choice([4, 6, 8])), 8)]) for i in range(n)]
    return heavy, [anyres_sample(100 + i, []) for i in range(n)]


def anyres_global(shards: tuple[list[dict], list[dict]]) -> GlobalBudgetedIterator:
    its = {v: BudgetedBatchIterator(iter(anyres_rows(s)), 4, 2, 2 * PATCHES, 0, keep_slots=True, anyres=ANYRES)
           for v, s in enumerate(shards)}
    return GlobalBudgetedIterator(lambda v: its[v], its, range(2), 2, shard_rows=4, n_devices=2, budget=2 * PATCHES,
                                  max_migrants=2, slack=PATCHES // 8)


def anyres_seen(batch: dict) -> list[int]:
    """Samples in an AnyRes batch, each checked: its patches in its own row (values = its number)."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        ids = [int(batch["input_ids"][r][seg == s][0]) // 1000 - 1 for s in np.unique(seg[seg > 0])]
        real = batch["anyres_patches"][r][batch["anyres_segment_ids"][r] > 0]
        assert set(np.unique(real[:, 0]).tolist()) <= {i + 1.0 for i in ids}
        out += ids
    return out


def balance(batches: list[dict], key: str, devices: int) -> float:
    """Mean over steps of the per-device max/mean load (devices taking contiguous row blocks)."""
    loads = [(np.asarray(b[key]) > 0).reshape(devices, -1).sum(axis=1) for b in batches]
    return float(np.mean([x.max() / x.mean() for x in loads]))


def test_anyres_rows_patch_balanced_over_both_shards_every_sample_once_and_restore():
    data = anyres_skewed(16)
    batches = list(anyres_global(data))
    assert sorted(i for b in batches for i in anyres_seen(b)) == list(range(16)) + list(range(100, 116))
    assert all(int(b["deferred_rows"]) == 0 for b in batches)
    process = list(ShardedIterator(lambda v: iter(VisualBatchIterDataset(anyres_rows(data[v]), 4, 2, 0, ANYRES)),
                                   range(2), 2))
    assert set(process[0]) == set(batches[0]) - {"deferred_rows"}
    for a, b in zip(process, batches, strict=True):
        assert a["anyres_patches"].shape == b["anyres_patches"].shape == (8, PATCHES, DIM)
    got, want = balance(batches, "anyres_segment_ids", 4), balance(process, "anyres_segment_ids", 4)
    assert got < 1.3 and want >= 2.0, (got, want)  # per shard: the text shard's devices hold no patches
    it = anyres_global(data)
    next(it), next(it)
    again = anyres_global(data)
    again.set_state(json.loads(json.dumps(it.get_state())))
    for a, b in zip(batches[2:], list(again), strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def unbudgeted(options: dict, cfg, state: dict | None = None, steps: int = 3) -> tuple[list[dict], dict]:
    """`steps` batches of the Grain factory (restored from `state` if given) and its state after them."""
    it = grain_data(cfg=cfg, global_batch_size=16, seq_len=96, process_index=0, process_count=1, seed=0, **options)
    if state is not None:
        it.set_state(state)
    out = [next(it) for _ in range(steps)]
    return out, json.loads(json.dumps(it.get_state()))


@pytest.mark.parametrize("model", ["tiles", "anyres"])
def test_factory_balances_tiles_and_anyres_patches_globally_without_a_budget(data_dir, tmp_path, model):
    path = skewed_jsonl(tmp_path / "data", 64)
    cfg, mask, extra = (CFG, "tile_mask", {}) if model == "tiles" else (ANYRES_CFG, "anyres_segment_ids",
                                                                        {"max_patches": 128})
    options = lambda mode: {**factory_options(path, data_dir, mode), "tile_budget": None, "max_migrants": 4, **extra}
    one, state = unbudgeted(options("global"), cfg, steps=1)
    assert state["shards"]["0"]["data_config"]["tile_balance"] == "global"  # a per-shard checkpoint differs
    rest, _ = unbudgeted(options("global"), cfg, state, steps=2)
    for a, b in zip(unbudgeted(options("global"), cfg)[0][1:], rest, strict=True):  # restored: the same batches
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    process = unbudgeted(options("process"), cfg)[0]
    assert "deferred_rows" not in process[0] and set(one[0]) - set(process[0]) == {"deferred_rows"}
    got, want = balance(one + rest, mask, 8), balance(process, mask, 8)
    assert got == 1.0 and want == 2.0, (got, want)  # the image shard's rows spread over both shards' devices


def test_auto_tile_balance_is_global_only_while_the_migrant_exchange_is_small():
    """"auto" weighs one step's migrant buffer (shards x max_migrants full rows, received by every process): the
    tiny rows here exchange globally; 448-px 8B rows over 64 shards would move gigabytes a step and stay per shard;
    an explicit choice is kept."""
    from sail_jax.config import get_preset
    from sail_jax.data.pipeline import DataConfig, resolve_tile_balance

    small = DataConfig(datasets=({"path": "x.jsonl"},), tokenizer_dir="t", seq_len=64, batch_size=8, max_tiles=2)
    assert resolve_tile_balance(small, CFG, 2) == "global"
    big = DataConfig(datasets=({"path": "x.jsonl"},), tokenizer_dir="t", seq_len=4096, batch_size=16, max_tiles=16)
    assert resolve_tile_balance(big, get_preset("sailvl2-8b"), 64) == "process"  # 64 x 4 rows of ~39 MB
    one = dataclasses.replace(big, max_migrants=1)
    assert resolve_tile_balance(one, get_preset("sailvl2-8b"), 4) == "global"  # 4 x 1 row: ~154 MB
    assert resolve_tile_balance(dataclasses.replace(big, tile_balance="global"), get_preset("sailvl2-8b"), 64) \
        == "global"
