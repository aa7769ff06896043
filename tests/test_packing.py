"""Stream packing and visual packing on synthetic samples (no tokenizer, no images): row contents, static shapes,
bounded waiting of long / tile-heavy samples, tile balance over devices, skip accounting."""

from __future__ import annotations

import logging

import grain
import numpy as np
import pytest

from sail_jax.data.batch import KEYS
from sail_jax.data.packing import (
    SkipBadSamplesIterDataset,
    VisualBatchIterDataset,
    balance_rows,
    batch_stats,
    pack_rows,
)
from tests.data_utils import skip_counts

S = 4  # tile side: the packer only moves tiles around


def sample(i: int, length: int, tiles: int, dataset: int = 0) -> dict:
    """Token values encode (sample, position) and tile values the sample, so misplacement is visible."""
    return {
        "input_ids": (1000 * (i + 1) + np.arange(length)).astype(np.int32),
        "loss_mask": (np.arange(length) % 3 == 1).astype(np.int32),
        "pixel_values": np.full((tiles, 3, S, S), i + 1, np.float32) + np.arange(tiles)[:, None, None, None] / 100,
        "info": {"dataset": dataset, "where": f"f:{i + 1}", "tokens": length, "tiles": tiles},
    }


def stream(samples: list[dict]) -> grain.IterDataset:
    return grain.MapDataset.source(samples).to_iter_dataset(grain.ReadOptions(num_threads=0))


def test_packed_rows_hold_each_sample_once_in_order():
    rng = np.random.default_rng(0)
    samples = [sample(i, int(rng.integers(1, 40)), int(rng.integers(0, 4))) for i in range(60)]
    seq_len, max_tiles = 64, 6
    rows = list(pack_rows(stream(samples), seq_len, max_tiles, num_bins=4, seed=1))
    seen = []
    for row in rows:
        assert row["input_ids"].shape == (seq_len,) and row["pixel_values"].shape == (max_tiles, 3, S, S)
        seg, tile_seg = row["input_ids_segment_ids"], row["pixel_values_segment_ids"]
        tile_pos = 0
        for s, info in enumerate(row["info"], start=1):
            i = int(info["where"].split(":")[1]) - 1
            ref = samples[i]
            at = seg == s
            np.testing.assert_array_equal(row["input_ids"][at], ref["input_ids"])
            np.testing.assert_array_equal(row["input_ids_positions"][at], np.arange(len(ref["input_ids"])))
            np.testing.assert_array_equal(row["loss_mask"][at], ref["loss_mask"])
            # Tiles sit in sample order, so a row's k-th image-token run matches its k-th tiles.
            n = len(ref["pixel_values"])
            np.testing.assert_array_equal(tile_seg[tile_pos:tile_pos + n], s)
            np.testing.assert_array_equal(row["pixel_values"][tile_pos:tile_pos + n], ref["pixel_values"])
            tile_pos += n
            seen.append(i)
        assert not (tile_seg[tile_pos:] > 0).any() and not row["pixel_values"][tile_pos:].any()
        pad = np.flatnonzero(seg == 0)
        assert not pad.size or (seg[pad[0]:] == 0).all()  # padding only at the end
    assert sorted(seen) == list(range(len(samples)))


def test_batches_have_static_shapes_and_padding_rows():
    samples = [sample(i, 30, 2) for i in range(7)]
    batches = list(VisualBatchIterDataset(pack_rows(stream(samples), 32, 4, 2, 0), 4, 2, pad_id=7))
    assert len(batches) == 2
    for b in batches:
        assert tuple(b) == KEYS
        assert b["input_ids"].shape == b["segment_ids"].shape == b["positions"].shape == (4, 32)
        assert b["pixel_values"].shape == (4, 4, 3, S, S) and b["tile_mask"].shape == (4, 4)
        assert b["input_ids"].dtype == np.int32 and b["tile_mask"].dtype == bool
        assert (b["input_ids"][b["segment_ids"] == 0] == 7).all()
    last = batches[1]
    assert (last["segment_ids"].max(axis=1) == 0).sum() == 1  # 7 samples, one per row: the 8th row is empty
    assert sum(batch_stats(b)["samples"] for b in batches) == 7


@pytest.mark.parametrize("packer", ["best_fit", "first_fit"])
@pytest.mark.parametrize("heavy", ["long", "tiles"])
def test_long_or_tile_heavy_sample_waits_a_bounded_number_of_rows(packer, heavy):
    seq_len, max_tiles, num_bins = 64, 8, 4
    rng = np.random.default_rng(1)
    samples = [sample(i, int(rng.integers(4, 20)), int(rng.integers(0, 3))) for i in range(300)]
    k = 150
    samples[k] = sample(k, seq_len, 1) if heavy == "long" else sample(k, 10, max_tiles)
    emitted, read_at = [0], {}

    def record(x):
        read_at[x["info"]["where"]] = emitted[0]
        return x

    rows = pack_rows(stream(samples).map(record), seq_len, max_tiles, num_bins, seed=0, packer=packer)
    found = None
    for r, row in enumerate(rows):
        emitted[0] = r + 1
        if any(info["where"] == f"f:{k + 1}" for info in row["info"]):
            found = r
    waited = found - read_at[f"f:{k + 1}"]
    assert 0 <= waited < num_bins


def test_balance_rows_is_a_balanced_permutation():
    tiles = [12, 12, 12, 12, 0, 0, 0, 0]
    order = balance_rows(tiles, 4)
    assert sorted(order) == list(range(8))
    np.testing.assert_array_equal(np.asarray(tiles)[order].reshape(4, 2).sum(1), [12, 12, 12, 12])
    with pytest.raises(ValueError, match="evenly"):
        balance_rows(tiles, 3)


def _rows(tile_counts: list[int], max_tiles: int) -> grain.IterDataset:
    rows = []
    for n in tile_counts:
        rows.append({"input_ids": np.ones(8, np.int32), "input_ids_segment_ids": np.ones(8, np.int32),
                     "input_ids_positions": np.arange(8, dtype=np.int32), "loss_mask": np.ones(8, np.int32),
                     "pixel_values": np.zeros((max_tiles, 3, S, S), np.float32),
                     "pixel_values_segment_ids": (np.arange(max_tiles) < n).astype(np.int32)})
    return stream(rows)


def test_visual_packing_reduces_max_over_mean_tiles_per_device():
    n_devices, batch, max_tiles = 4, 16, 12
    rng = np.random.default_rng(0)
    # Skewed: tile-heavy rows come in runs (e.g. a document-heavy stretch of the stream), the rest carry few tiles.
    counts = np.where(np.arange(160) % 16 < 5, rng.integers(9, 13, 160), rng.integers(0, 3, 160)).tolist()
    ratio = {}
    for devices in (1, n_devices):  # 1 = the naive order: rows stay as packed
        batches = list(VisualBatchIterDataset(_rows(counts, max_tiles), batch, devices))
        ratio[devices] = np.mean([batch_stats(b, n_devices)["tile_balance"] for b in batches])
    assert ratio[1] > 2.0 and ratio[n_devices] < 1.3  # 5 heavy rows over 4 devices cannot split evenly


def _marked(i: int, reason: str | None, dataset: int = 0) -> dict:
    if reason is None:
        return sample(i, 5, 0, dataset)
    return {"skip": reason, "dataset": dataset, "where": f"data{dataset}.jsonl:{i + 1}", "error": "boom"}


def test_skip_filter_counts_logs_and_keeps_counts_in_state(caplog):
    elements = [_marked(0, None), _marked(1, "malformed"), _marked(2, None), _marked(3, "missing_image", 1),
                _marked(4, None, 1), _marked(5, "too_long")]
    elements[2]["info"]["truncated"] = True
    ds = SkipBadSamplesIterDataset(stream(elements), ["data0.jsonl", "data1.jsonl"], max_skip_fraction=1.0)
    it = iter(ds)
    with caplog.at_level(logging.WARNING, logger="sail_jax.data"):
        kept = [x["info"]["where"] for x in it]
    assert kept == ["f:1", "f:3", "f:5"]
    counts = skip_counts({"outer": {"parent": it.get_state()}})
    assert counts["seen"] == [4, 2] and counts["malformed"] == [1, 0] and counts["missing_image"] == [0, 1]
    assert counts["too_long"] == [1, 0] and counts["truncated"] == [1, 0]
    assert "data0.jsonl:2 (malformed)" in caplog.text and "data1.jsonl:4 (missing_image)" in caplog.text
    restored = iter(ds)
    restored.set_state(it.get_state())
    assert skip_counts(restored.get_state()) == counts


def test_skip_fraction_limit_names_the_dataset_file():
    # The limit compares a 99.87% lower confidence bound of the bad fraction: all-bad data passes 0.5 after 10.
    elements = [_marked(i, None) for i in range(4)] + [_marked(i, "bad_image", 1) for i in range(4, 20)]
    ds = SkipBadSamplesIterDataset(stream(elements), ["good.jsonl", "broken.jsonl"], max_skip_fraction=0.5,
                                   min_samples=3)
    with pytest.raises(ValueError, match=r"dataset broken\.jsonl: 10 of 10 samples were unusable \(bad_image: 10\)"):
        list(ds)
