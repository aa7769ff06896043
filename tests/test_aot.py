"""Ahead-of-time compilation of the train step (`sail-jax compile`): the same step `train` runs, its memory
accounted exactly, gin read like `train` does, and clear errors."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from sail_jax.cli import main
from sail_jax.config import get_preset
from sail_jax.data.batch import abstract_batch, to_global
from sail_jax.sharding import make_mesh, target_platform, use_mesh
from sail_jax.training import aot
from sail_jax.training.metrics import CPU_NOMINAL_FLOPS, step_flops
from sail_jax.training.optim import OptimizerConfig
from sail_jax.training.program import build_program
from sail_jax.training.step import TrainState
from sail_jax.training.synthetic import synthetic_data

CFG = get_preset("tiny").replace(llm=dataclasses.replace(get_preset("tiny").llm, vocab_size=512),
                                 img_context_token_id=511)
OPT = OptimizerConfig(learning_rate=1e-3)
MESH = {"data": 2, "fsdp": 4}
ROWS, SEQ, TILES = 8, 64, 2


def _shard_bytes(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_compiled_step_is_the_trainers_step_and_its_memory_is_accounted():
    compiled, report = aot.compile_train_step(model=CFG, batch_size=ROWS, seq_len=SEQ, max_tiles=TILES,
                                              optimizer=OPT, mesh=MESH, target_fraction=0.5, steps=10)
    # the program `train` builds with the same arguments
    program = build_program(model=CFG, batch_size=ROWS, seq_len=SEQ, steps=10, optimizer=OPT, mesh=MESH,
                            target_fraction=0.5)
    mesh = program.mesh
    assert mesh == make_mesh(**MESH) and program.targets_per_row == 32
    batch_spec = abstract_batch(CFG, ROWS, SEQ, TILES, mesh)
    # Arguments: one device's shards of parameters, optimizer state and batch, plus the two scalars.
    expected = _shard_bytes((program.abstract_state, batch_spec)) + 8
    assert report.argument_bytes == expected
    assert report.alias_bytes > 0.9 * _shard_bytes(program.abstract_state)  # donated
    assert report.temp_bytes > 0 and report.num_devices == 8
    flops = step_flops(CFG, tokens=ROWS * SEQ, targets=ROWS * 32, tiles=ROWS * TILES, seq_len=SEQ,
                       trainable=("vision", "adapter", "llm"))
    assert report.model_flops_per_device == flops / 8 and report.min_step_s == flops / 8 / CPU_NOMINAL_FLOPS
    assert report.mesh == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    assert report.peak_bytes == (report.argument_bytes + report.output_bytes - report.alias_bytes
                                 + report.temp_bytes + report.code_bytes)
    assert report.hbm_bytes is None and report.fits is None  # CPU: no HBM figure to compare with
    assert "8 x cpu" in report.summary()

    # Run it on real inputs: bit-identical to the step `train` jits.
    local = next(synthetic_data(cfg=CFG, global_batch_size=ROWS, seq_len=SEQ, process_index=0, process_count=1,
                                seed=0, max_tiles=TILES))
    with use_mesh(mesh):
        batch = to_global(local, mesh, ROWS)
        assert batch["input_ids"].sharding.spec == batch_spec["input_ids"].sharding.spec
        params = program.init_params(jax.random.PRNGKey(0))
        make = lambda: TrainState(jax.tree.map(jax.numpy.copy, params), program.init_opt_state(params))
        ours, m_ours = compiled(make(), batch, np.int32(3), np.float32(1.0))
        ref, m_ref = program.step(make(), batch, np.int32(3), np.float32(1.0))
    assert float(m_ours["loss"]) == float(m_ref["loss"]) and np.isfinite(float(m_ours["loss"]))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hbm_table_and_fit():
    assert aot.hbm_bytes("TPU v5 lite") == 16 * aot.GIB and aot.hbm_bytes("TPU v5") == 95 * aot.GIB
    assert aot.hbm_bytes("TPU v6 lite") == 32 * aot.GIB and aot.hbm_bytes("cpu") is None
    r = aot.CompileReport(device_kind="TPU v5 lite", num_devices=4, mesh={}, parameters=1, argument_bytes=10 * aot.GIB,
                          output_bytes=10 * aot.GIB, alias_bytes=10 * aot.GIB, temp_bytes=7 * aot.GIB, code_bytes=0,
                          model_flops_per_device=394e12, peak_flops=197e12, hbm_bytes=16 * aot.GIB, compile_s=1.0)
    assert r.peak_bytes == 17 * aot.GIB and r.fits is False and r.min_step_s == 2.0
    assert "DOES NOT FIT" in r.summary() and "394 model TFLOP per device per step, >= 2 s at peak" in r.summary()


def test_target_platform_follows_the_mesh():
    assert target_platform() == jax.default_backend() == "cpu"
    seen = []
    with use_mesh(make_mesh(fsdp=-1)):
        assert target_platform() == "cpu"
        jax.jit(lambda x: seen.append(target_platform()) or x)(1.0)  # inside jit (the mesh's abstract device)
    assert seen == ["cpu"]


def test_compile_cli_reads_train_gin_without_data_or_workdir(tmp_path, capsys):
    out = tmp_path / "r" / "report.json"
    argv = ["compile", "--gin_file=configs/stage/sft.gin", "--gin_file=configs/demo.gin", "--gin.train.steps=50",
            "--gin.train.mesh={'data': 2, 'fsdp': -1}", "--gin.train.batch_size=8", "--gin.train.seq_len=128",
            f"--out={out}"]
    assert main(argv) == 0
    line = capsys.readouterr().out
    saved = json.loads(out.read_text())
    # demo.gin's grain_data.max_tiles (12) and its model (112-px tiles, 8 heads), sft.gin overridden by the flags
    assert saved["max_tiles"] == 12 and saved["batch_size"] == 8 and saved["seq_len"] == 128
    assert saved["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1} and saved["num_devices"] == 8
    assert saved["peak_bytes"] > saved["argument_bytes"] > 0 and "12 tile slots per row" in line
    assert not list(out.parent.glob("*.tmp"))


def test_compile_cli_errors(capsys):
    base = ["compile", "--gin_file=configs/stage/sft.gin", "--gin_file=configs/model/tiny.gin"]
    assert main(base) == 2  # sft.gin leaves train.steps %gin.REQUIRED
    assert "train.steps is not set" in capsys.readouterr().err
    assert main(["compile", "--gin_file=configs/stage/sft.gin"]) == 2
    assert "required gin macro(s) not set: MODEL" in capsys.readouterr().err
    if not _has_libtpu():
        assert main([*base, "--gin.train.steps=5", "--topology=v5p:2x2x1"]) == 2
        assert "libtpu" in capsys.readouterr().err


def test_batch_must_split_over_the_mesh():
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by the batch shards"):
        aot.compile_train_step(model=CFG, batch_size=6, seq_len=SEQ, max_tiles=TILES, mesh={"fsdp": 4})
    spec = abstract_batch(CFG, 8, SEQ, 0, make_mesh(data=2, fsdp=4))
    size = CFG.vision.image_size
    assert spec["pixel_values"].shape == (8, 0, 3, size, size)
    assert spec["tile_mask"].sharding.shard_shape((8, 0)) == (1, 0)
    assert spec["input_ids"].sharding.shard_shape((8, SEQ)) == (1, SEQ)


def _has_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True
