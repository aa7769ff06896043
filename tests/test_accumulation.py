"""Gradient accumulation (`train.microbatches`): k micro-batches make the update of the whole batch (dense and MoE,
one device and a data x fsdp mesh), micro-batches are shard-local row slices, the guard sees the whole step, and
the compiled step's temporaries shrink with the micro-batch."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from sail_jax.config import PRESETS
from sail_jax.data.batch import to_global
from sail_jax.sharding import batch_sharding, make_mesh, use_mesh
from sail_jax.training import aot
from sail_jax.training.optim import OptimizerConfig
from sail_jax.training.program import build_program
from sail_jax.training.step import TrainState, micro_batch
from sail_jax.training.synthetic import synthetic_data

BASE = PRESETS["tiny"]
DENSE = BASE.replace(llm=dataclasses.replace(BASE.llm, vocab_size=512, num_layers=1),
                     vision=dataclasses.replace(BASE.vision, image_size=56, num_layers=1), img_context_token_id=511)
MOE_BASE = PRESETS["tiny-moe"]
# a router loss coefficient large enough that its gradient moves the parameters visibly
MOE = DENSE.replace(llm=dataclasses.replace(
    MOE_BASE.llm, vocab_size=512, num_layers=1, moe=dataclasses.replace(MOE_BASE.llm.moe, router_aux_loss_coef=0.1)))
# Adam's eps is raised from 1e-8: at 1e-8 an element whose gradient is ~0 moves by up to the learning rate on float32
# rounding noise alone (any change of summation order does that, not only accumulation); 1e-3 keeps every
# parameter's update a smooth function of its gradient, so the comparison sees the gradient itself.
OPT = OptimizerConfig(learning_rate=1e-3, warmup_fraction=0.0, eps=1e-3)
SEQ, TILES, STEPS = 32, 1, 3
MESH = {"data": 2, "fsdp": 4}


def run_steps(cfg, rows: int, microbatches: int, mesh: dict[str, int] | None, devices, poison_row: int | None = None):
    """(params after STEPS steps, metrics of each step) of `train`'s program on the same synthetic batches."""
    program = build_program(model=cfg, batch_size=rows, seq_len=SEQ, steps=STEPS, optimizer=OPT, mesh=mesh,
                            microbatches=microbatches, devices=devices)
    data = synthetic_data(cfg=cfg, global_batch_size=rows, seq_len=SEQ, process_index=0, process_count=1, seed=1,
                          max_tiles=TILES)
    history = []
    with use_mesh(program.mesh):
        params = program.init_params(jax.random.PRNGKey(0))
        state = TrainState(params, program.init_opt_state(params))
        for step in range(STEPS):
            local = next(data)
            if poison_row is not None and step == 1:
                assert local["tile_mask"][poison_row].any()
                local["pixel_values"][poison_row] = np.nan
            state, m = program.step(state, to_global(local, program.mesh, rows), np.int32(step), np.float32(1.0))
            history.append({k: float(v) for k, v in jax.device_get(m).items()})
    return jax.device_get(state.params), history


def assert_same_update(a, b, history_a, history_b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        rel = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
        assert rel <= 1e-6, (jax.tree_util.keystr(path), rel)
    for ma, mb in zip(history_a, history_b, strict=True):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-7), k


def test_four_micro_batches_of_a_moe_model_make_the_update_of_the_whole_batch():
    one = [jax.devices()[0]]
    whole, h1 = run_steps(MOE, 8, 1, None, one)
    accumulated, h4 = run_steps(MOE, 8, 4, None, one)
    assert_same_update(accumulated, whole, h4, h1)
    assert h1[0]["skipped"] == 0 and h1[-1]["loss"] < h1[0]["loss"]
    # the router loss is in play: each micro-batch's share is normalised by the whole step's routing counts
    assert h4[0]["aux_loss"] > 0.5 * 0.1 * MOE.llm.moe.num_experts_per_tok and "expert_entropy" in h4[0]


def test_four_micro_batches_on_a_data_fsdp_mesh_make_the_update_of_the_whole_batch():
    whole, h1 = run_steps(DENSE, 32, 1, MESH, None)
    accumulated, h4 = run_steps(DENSE, 32, 4, MESH, None)
    assert_same_update(accumulated, whole, h4, h1)
    assert h4[0]["targets"] == h1[0]["targets"] > 0 and h4[0]["tokens"] == h1[0]["tokens"]


def test_a_micro_batch_is_each_shards_own_rows():
    mesh = make_mesh(data=2, fsdp=4)
    x = np.arange(32 * 3).reshape(32, 3)
    with use_mesh(mesh):
        sharded = jax.device_put(x, batch_sharding(mesh, x.shape))
        fn = jax.jit(lambda b, j: micro_batch(b, j, 4, 8), out_shardings=batch_sharding(mesh, (8, 3)))
        hlo = fn.lower({"x": sharded}, 1).compile().as_text()
        out = fn({"x": sharded}, 1)["x"]
    # rows 4 d + 1 of every block of 4 (device d's block): no row crosses devices
    np.testing.assert_array_equal(np.asarray(out), x[1::4])
    for op in ("all-to-all", "collective-permute", "all-gather", "all-reduce"):
        assert op not in hlo, op
    for shard in out.addressable_shards:
        src = next(s for s in sharded.addressable_shards if s.device == shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(src.data)[1::4])


def test_a_non_finite_micro_batch_skips_the_whole_step():
    clean, _ = run_steps(DENSE, 32, 4, MESH, None)
    params, history = run_steps(DENSE, 32, 4, MESH, None, poison_row=31)  # the last shard's last micro-batch
    assert [h["skipped"] for h in history] == [0.0, 1.0, 0.0]
    assert not np.isfinite(history[1]["loss"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(clean)))


def test_micro_batches_must_split_every_shard():
    with pytest.raises(ValueError, match="microbatches=3 must be >= 1 and split each of the 8 batch shards"):
        build_program(model=DENSE, batch_size=16, seq_len=SEQ, steps=1, microbatches=3)


def test_compiled_temporaries_are_those_of_one_micro_batch():
    kw = dict(model=DENSE, batch_size=32, seq_len=128, max_tiles=0, optimizer=OPT, mesh=MESH)
    _, whole = aot.compile_train_step(**kw)
    _, micro = aot.compile_train_step(**kw, microbatches=4)
    assert micro.microbatches == 4 and "4 micro-batches" in micro.summary()
    assert micro.argument_bytes == whole.argument_bytes
    assert micro.temp_bytes < 0.5 * whole.temp_bytes, (micro.temp_bytes, whole.temp_bytes)
