"""Visual packing on a tile budget: row assignment and the data-chosen budget, every sample exactly once over an
epoch (deferred rows included, across a checkpoint restore), deferred rows counted, and the budgeted ViT giving the
fixed-slot loss and gradients on the same batch over 8 devices."""

from __future__ import annotations

import dataclasses
import json
import math

import grain
import jax
import numpy as np
import pytest

from sail_jax.config import IMG_CONTEXT_TOKEN_ID, PRESETS
from sail_jax.data.batch import BUDGET_KEYS, abstract_batch, check_batch, to_global
from sail_jax.data.packing import balance_rows, pack_rows
from sail_jax.data.pipeline import DataConfig, DatasetSpec, build_dataset, resolve_tile_budget
from sail_jax.data.tile_budget import (
    BudgetedBatchIterDataset,
    assign_rows,
    auto_budget,
    balanced_loads,
    pack_tiles,
)
from sail_jax.evaluation.demo import make_demo_data
from sail_jax.sharding import mesh_from_spec, use_mesh
from sail_jax.training.program import build_program
from sail_jax.training.step import make_loss_fn, micro_batch
from sail_jax.training.synthetic import SyntheticSource
from sail_jax.training.trainer import train

S = 4  # tile side in the pipeline tests: the packer only moves tiles around
BASE = PRESETS["tiny"]
CFG = BASE.replace(llm=dataclasses.replace(BASE.llm, vocab_size=512, num_layers=1),
                   vision=dataclasses.replace(BASE.vision, image_size=56, num_layers=1), img_context_token_id=511)


def test_assign_rows_respects_both_capacities_and_defers_the_rest():
    loads = [5, 5, 5, 1, 0, 3]
    device = assign_rows(loads, n_devices=2, rows_per_device=2, budget=6)
    per_device = np.bincount(device[device >= 0], weights=np.asarray(loads)[device >= 0], minlength=2)
    assert (per_device <= 6).all() and (np.bincount(device[device >= 0]) <= 2).all()
    np.testing.assert_array_equal(device, [0, 1, -1, 0, 1, -1])  # LPT: 5, 5 placed; the third 5 and the 3 wait
    assert assign_rows([4, 4, 4], 1, 3, budget=4, ordered=1)[0] == 0  # the oldest waiting row goes first
    np.testing.assert_array_equal(balanced_loads([12, 1, 1, 12, 6, 6], 3), [13, 13, 12])
    assert auto_budget([[12, 1, 1, 12, 6, 6]], 3, quantile=1.0, min_budget=12, multiple=4) == 16
    assert auto_budget([[0, 0]], 2, quantile=0.9, min_budget=3) == 3


def test_pack_tiles_keeps_each_tiles_row_and_ordinal():
    rng = np.random.default_rng(0)
    mask = np.zeros((4, 3), bool)
    mask[0, :2] = mask[1, :3] = mask[3, :1] = True
    pix = rng.standard_normal((4, 3, 1, 2, 2)).astype(np.float32)
    packed, index = pack_tiles(pix, mask, n_devices=2, budget=5)
    assert packed.shape == (10, 1, 2, 2) and index.shape == (2, 5, 2)
    np.testing.assert_array_equal(index[0], [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]])
    np.testing.assert_array_equal(index[1], [[1, 0], [-1, -1], [-1, -1], [-1, -1], [-1, -1]])
    np.testing.assert_array_equal(packed[5], pix[3, 0])
    assert not packed[6:].any()
    with pytest.raises(ValueError, match="device 0's rows hold 5 tiles, more than the tile budget 4"):
        pack_tiles(pix, mask, 2, 4)


def sample(i: int, length: int, tiles: int) -> dict:
    """Token values encode the sample and tile values (sample, k), so every placement can be checked."""
    return {"input_ids": (1000 * (i + 1) + np.arange(length)).astype(np.int32),
            "loss_mask": np.ones(length, np.int32),
            "pixel_values": np.full((tiles, 3, S, S), i + 1, np.float32) + np.arange(tiles)[:, None, None, None] / 100,
            "info": {"dataset": 0, "where": f"f:{i + 1}"}}


def rows(samples: list[dict], seq_len: int = 32, max_tiles: int = 6) -> grain.IterDataset:
    return pack_rows(grain.MapDataset.source(samples).to_iter_dataset(grain.ReadOptions(num_threads=0)),
                     seq_len, max_tiles, num_bins=2, seed=0)


def seen_samples(batch: dict, n_devices: int) -> list[int]:
    """Samples in a budgeted batch, each checked: its tokens in one row, its tiles in that row's device block with
    the right (row, ordinal)."""
    out, per_device = [], batch["input_ids"].shape[0] // n_devices
    budget = batch["tile_index"].shape[1]
    for r in range(batch["input_ids"].shape[0]):
        d, local = divmod(r, per_device)
        slots = np.flatnonzero(batch["tile_index"][d, :, 0] == local)
        tiles = batch["pixel_values"][d * budget + slots][:, 0, 0, 0]
        np.testing.assert_array_equal(batch["tile_index"][d, slots, 1], np.arange(len(slots)))
        k = 0
        for s in np.unique(batch["segment_ids"][r][batch["segment_ids"][r] > 0]):
            i = int(batch["input_ids"][r][batch["segment_ids"][r] == s][0]) // 1000 - 1
            out.append(i)
            n = int((np.floor(tiles[k:] + 1e-6) == i + 1).sum())
            np.testing.assert_allclose(tiles[k:k + n], i + 1 + np.arange(n) / 100, atol=1e-6)
            k += n
        assert k == len(slots)
    return out


def test_budgeted_epoch_sees_every_sample_once_and_counts_deferred_rows():
    rng = np.random.default_rng(1)
    samples = [sample(i, 30, int(rng.choice([0, 1, 2, 6, 6]))) for i in range(48)]  # one sample per row
    ds = BudgetedBatchIterDataset(rows(samples), batch_size=8, n_devices=4, budget=6, max_tiles=6, pad_id=0)
    batches = list(ds)
    seen = [i for b in batches for i in seen_samples(b, 4)]
    assert sorted(seen) == list(range(48))  # nothing dropped, nothing twice
    for b in batches:
        check_batch(b, 8, 32, CFG.replace(vision=dataclasses.replace(CFG.vision, image_size=S)))
        assert tuple(k for k in b if k in BUDGET_KEYS) == BUDGET_KEYS and b["tile_index"].shape == (4, 6, 2)
    assert sum(int(b["deferred_rows"]) for b in batches) > 0 and int(batches[-1]["deferred_rows"]) == 0
    with pytest.raises(ValueError, match="tile_budget=5 must be >= max_tiles=6"):
        BudgetedBatchIterDataset(rows(samples), 8, 4, budget=5, max_tiles=6)


def test_restored_iterator_keeps_its_waiting_rows():
    rng = np.random.default_rng(2)
    samples = [sample(i, 30, int(rng.choice([0, 3, 6]))) for i in range(40)]
    ds = BudgetedBatchIterDataset(rows(samples), batch_size=4, n_devices=2, budget=6, max_tiles=6)
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    assert state["waiting"], "the test needs rows waiting at the checkpoint"
    rest = list(it)
    again = iter(ds)
    again.set_state(state)
    restored = list(again)
    assert len(restored) == len(rest)
    for a, b in zip(rest, restored):
        for k in (*BUDGET_KEYS, "deferred_rows"):
            np.testing.assert_array_equal(a[k], b[k])
    seen = [i for b in first + rest for i in seen_samples(b, 2)]
    assert sorted(seen) == list(range(40))


def test_budgeted_vit_gives_the_fixed_slot_loss_and_gradients_on_8_devices():
    src = SyntheticSource(global_batch_size=16, seq_len=64, vocab_size=512, img_context_id=511,
                          tokens_per_tile=CFG.tokens_per_tile, image_size=56, max_tiles=4, seed=3)
    fixed, groups = src.batch_at(0), 8
    fixed["tile_mask"][1::2, 1:] = False  # odd rows keep one tile (their further image tokens stay text)
    fixed["tile_mask"][2::4, 2:] = False
    order = balance_rows(fixed["tile_mask"].sum(axis=1), groups)
    fixed = {k: v[order] for k, v in fixed.items()}
    budget = int(fixed["tile_mask"].reshape(groups, -1).sum(axis=1).max())
    assert budget < 2 * 4, budget  # fewer tiles through the ViT than the 2 rows x 4 slots each device holds
    pixels, index = pack_tiles(fixed["pixel_values"], fixed["tile_mask"], groups, budget)
    budgeted = {**{k: fixed[k] for k in BUDGET_KEYS[:4]}, "pixel_values": pixels, "tile_index": index}
    check_batch(budgeted, 16, 64, CFG)
    program = build_program(model=CFG, batch_size=16, seq_len=64, steps=1, mesh={"fsdp": 8})
    loss_fn = jax.jit(jax.value_and_grad(make_loss_fn(CFG, 64, budget_groups=8), has_aux=True))
    with use_mesh(program.mesh):
        params = program.init_params(jax.random.PRNGKey(0))
        (l_fixed, m_fixed), g_fixed = loss_fn(params, to_global(fixed, program.mesh, 16))
        (l_budget, m_budget), g_budget = loss_fn(params, to_global(budgeted, program.mesh, 16))
    np.testing.assert_allclose(float(l_budget), float(l_fixed), rtol=1e-6)
    assert float(m_budget["tiles"]) == float(m_fixed["tiles"]) == fixed["tile_mask"].sum()
    for a, b in zip(jax.tree.leaves(g_fixed["vision_model"]), jax.tree.leaves(g_budget["vision_model"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    spec = abstract_batch(CFG, 16, 64, 4, mesh_from_spec({"fsdp": 8}), tile_budget=budget)
    assert spec["pixel_values"].shape == (8 * budget, 3, 56, 56) and spec["tile_index"].shape == (8, budget, 2)


def test_pipeline_with_auto_budget_sees_each_demo_sample_once_and_restores(data_dir, tmp_path):
    make_demo_data(tmp_path, n=24, seed=0, n_heldout=2)
    cfg = DataConfig(datasets=(DatasetSpec(str(tmp_path / "train.jsonl")),), tokenizer_dir=str(data_dir / "tokenizer"),
                     seq_len=512, batch_size=4, max_tiles=8, image_size=56, num_devices=2, num_workers=0,
                     num_packing_bins=4, num_epochs=1, tile_budget="auto", tile_budget_quantile=0.5)
    budget = resolve_tile_budget(cfg, 1)
    assert budget >= 8
    it = iter(build_dataset(cfg, 0, 1))
    first = next(it)
    state = it.get_state()
    batches = [first, *it]
    again = iter(build_dataset(cfg, 0, 1))
    again.set_state(state)
    for a, b in zip(batches[1:], list(again), strict=True):
        for k in BUDGET_KEYS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    samples = 0
    for b in batches:
        index = b["tile_index"]
        assert index.shape == (2, budget, 2)
        tiles = np.array([[(index[d, :, 0] == r).sum() for r in range(2)] for d in range(2)]).reshape(-1)
        np.testing.assert_array_equal((b["input_ids"] == IMG_CONTEXT_TOKEN_ID).sum(axis=1), tiles * 4)
        samples += int(b["segment_ids"].max(axis=1).sum())
    assert samples == 24
    assert all("deferred_rows" in b for b in batches)
    with pytest.raises(ValueError, match="tile_budget=4: expected None, 'auto' or an int >= max_tiles=8"):
        dataclasses.replace(cfg, tile_budget=4)


def test_micro_batches_of_a_budgeted_batch_hold_their_own_rows_tiles():
    """With G = shards x micro-batches tile groups, micro-batch j of each shard (`step.micro_batch`) gets exactly
    the packed tiles of its own rows: what packing those rows alone over the shards gives."""
    rng = np.random.default_rng(4)
    shards, micro, rows_per_group, slots, budget = 2, 2, 2, 3, 6
    rows = shards * micro * rows_per_group
    mask = np.zeros((rows, slots), bool)
    for r, n in enumerate(rng.integers(0, slots + 1, rows)):
        mask[r, :n] = True
    pix = rng.standard_normal((rows, slots, 1, 2, 2)).astype(np.float32) * mask[..., None, None, None]
    ids = np.arange(rows * 4, dtype=np.int32).reshape(rows, 4)
    pixels, index = pack_tiles(pix, mask, shards * micro, budget)
    batch = {"input_ids": ids, "pixel_values": pixels, "tile_index": index}
    for j in range(micro):
        got = jax.tree.map(np.asarray, micro_batch(batch, j, micro, shards))
        fixed = {"input_ids": ids, "pixel_values": pix, "tile_mask": mask}
        want = jax.tree.map(np.asarray, micro_batch(fixed, j, micro, shards))
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        w_pixels, w_index = pack_tiles(want["pixel_values"], want["tile_mask"], shards, budget)
        np.testing.assert_array_equal(got["tile_index"], w_index)
        np.testing.assert_array_equal(got["pixel_values"], w_pixels)


def budgeted_synthetic(*, cfg, global_batch_size, seq_len, process_index, process_count, seed):
    """A data factory of budgeted batches: samples of up to two 56-px tiles packed into rows of `seq_len`, two rows
    and 2 tiles per device, so tile-heavy rows wait."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(40):
        tiles = int(rng.choice([0, 1, 2]))
        ids = np.concatenate([np.full(tiles * cfg.tokens_per_tile, cfg.img_context_token_id),
                              rng.integers(1, 64, 12)]).astype(np.int32)
        samples.append({"input_ids": ids, "loss_mask": (np.arange(len(ids)) >= len(ids) - 6).astype(np.int32),
                        "pixel_values": rng.standard_normal((tiles, 3, 56, 56), dtype=np.float32),
                        "info": {"dataset": 0, "where": f"s:{i}"}})
    ds = grain.MapDataset.source(samples).repeat(None).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return iter(BudgetedBatchIterDataset(pack_rows(ds, seq_len, 2, num_bins=2, seed=seed), global_batch_size, 4,
                                         budget=2, max_tiles=2))


def test_trainer_steps_on_budgeted_batches_and_reports_deferred_rows(tmp_path):
    """`train` on budgeted batches: the jitted, donated, sharded step on a {data: 2, fsdp: 2} mesh, a finite loss,
    and each step's `deferred_rows` in its metrics."""
    train(model=CFG, data=budgeted_synthetic, workdir=str(tmp_path), steps=2, batch_size=8, seq_len=24,
          trainable=("adapter",), mesh={"data": 2, "fsdp": 2}, log_every=1)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(math.isfinite(m["loss"]) and 0 < m["tiles"] <= 8 for m in steps), steps
    assert sum(m["deferred_rows"] for m in steps) > 0
