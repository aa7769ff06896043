"""Elastic data positions (`data.elastic`) in one process: the Grain pipeline's data shards give the same global
batches for any process count that divides them, and a position saved by P processes re-splits exactly for P'."""

from __future__ import annotations

import dataclasses

import grain.checkpoint
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sail_jax.config import get_preset
from sail_jax.data.elastic import NotResplittable, merge_states
from sail_jax.data.epochs import grain_packed_rows
from sail_jax.data.pipeline import DataConfig, build_dataset, grain_data
from sail_jax.evaluation.demo import make_demo_data
from sail_jax.training.checkpointing import IteratorRestore
from sail_jax.training.synthetic import synthetic_data

TINY = get_preset("tiny")
CFG = dataclasses.replace(TINY, vision=dataclasses.replace(TINY.vision, image_size=56))
BATCH = 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, n=24, seed=0, n_heldout=2)
    return out


# "process" balancing: the processes here are simulated in one Python process, which the global placement's
# collectives cannot be (its process-count independence: tests/test_global_balance.py).
OPTIONS = dict(max_tiles=8, max_num=2, num_workers=0, num_packing_bins=4, num_devices=1, prefetch_batches=0,
               tile_balance="process")


def grain_processes(demo, data_dir, process_count: int, shards: int | None = 2) -> list:
    return [grain_data(cfg=CFG, global_batch_size=BATCH, seq_len=512, process_index=p, process_count=process_count,
                       seed=3, datasets=[{"path": str(demo / "train.jsonl")}],
                       tokenizer_dir=str(data_dir / "tokenizer"), data_shards=shards, **OPTIONS)
            for p in range(process_count)]


def global_batch(its: list) -> dict[str, np.ndarray]:
    parts = [next(it) for it in its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def resume(states: list, its: list) -> list:
    merged = merge_states(states, len(its))
    for it in its:
        it.set_state(merged)
    return its


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_grain_shards_resume_on_another_process_count_with_the_same_batches(demo, data_dir, before, after):
    one = grain_processes(demo, data_dir, 1)
    reference = [global_batch(one) for _ in range(5)]
    first = grain_processes(demo, data_dir, before)
    for want in reference[:2]:
        assert_batches_equal(global_batch(first), want)  # any process count: the same global batches
    second = resume([it.get_state() for it in first], grain_processes(demo, data_dir, after))
    for want in reference[2:]:
        assert_batches_equal(global_batch(second), want)


def test_positions_that_cannot_be_re_split_are_refused(demo, data_dir):
    single = grain_processes(demo, data_dir, 1, shards=1)
    with pytest.raises(NotResplittable, match="the data stream has 1 data shards, which 2 processes cannot split"):
        merge_states([single[0].get_state()], 2)
    with pytest.raises(NotResplittable, match=r"saved per process by 2 process\(es\) and cannot be re-split for 1"):
        merge_states([{"step": 3}, {"step": 3}], 1)
    with pytest.raises(NotResplittable, match="must stay the same on resume: set --gin.grain_data.data_shards=1"):
        grain_processes(demo, data_dir, 1, shards=4)[0].set_state(single[0].get_state())


def test_synthetic_position_is_global():
    def source(p: int, n: int):
        return synthetic_data(cfg=dataclasses.replace(CFG, img_context_token_id=CFG.llm.vocab_size - 1),
                              global_batch_size=BATCH, seq_len=64, process_index=p, process_count=n, seed=1)

    two = [source(0, 2), source(1, 2)]
    one = source(0, 1)
    reference = [next(one) for _ in range(3)]
    assert_batches_equal(global_batch(two), reference[0])
    (resumed,) = resume([it.get_state() for it in two], [source(0, 1)])
    for want in reference[1:]:
        assert_batches_equal(next(resumed), want)


def test_a_checkpoint_from_before_data_shards_resumes_on_its_process_count(demo, data_dir, tmp_path):
    """Written by Grain's own handler from a bare pipeline iterator, as `grain_data` made them before."""
    cfg = DataConfig(datasets=({"path": str(demo / "train.jsonl")},), tokenizer_dir=str(data_dir / "tokenizer"),
                     seq_len=512, batch_size=BATCH, image_size=56, seed=3, **OPTIONS)
    old = iter(build_dataset(cfg, 0, 1))
    next(old)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(1, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(old)))
    (new,) = grain_processes(demo, data_dir, 1, shards=None)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.restore(1, args=ocp.args.Composite(data_iter=IteratorRestore(new)))
    assert_batches_equal(next(new), next(old))


def test_train_epochs_counts_the_same_rows_with_data_shards(demo, data_dir, tmp_path):
    kw = dict(cfg=CFG, seq_len=512, seed=3, datasets=[{"path": str(demo / "train.jsonl")}],
              tokenizer_dir=str(data_dir / "tokenizer"), workdir=tmp_path, **OPTIONS)
    assert grain_packed_rows(**kw, data_shards=2).rows == grain_packed_rows(**kw).rows > 0
