"""SAIL-ViT-AnyRes training: the Grain pipeline packs text AND patch budgets into the batch contract's AnyRes keys,
the train step on those batches over 8 fake devices equals the single-device step, `sail-jax train --anyres`."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image

from sail_jax.cli import main
from sail_jax.config import IMG_CONTEXT_TOKEN_ID, get_preset
from sail_jax.data.batch import abstract_batch, batch_shapes, check_batch, to_global
from sail_jax.data.pipeline import DataConfig, DatasetSpec, build_dataset
from sail_jax.data.processor import SailProcessor
from sail_jax.sharding import use_mesh
from sail_jax.training.optim import OptimizerConfig
from sail_jax.training.program import build_program
from sail_jax.training.step import TrainState
from tests.conftest import DATA

_BASE = get_preset("tiny-anyres")
CFG = _BASE.replace(vision=dataclasses.replace(_BASE.vision, num_layers=1, max_anyres_patches=256),
                    llm=dataclasses.replace(_BASE.llm, num_layers=1))
ROWS, SEQ, PATCHES = 8, 128, 128
SIZES = [(56, 84), (112, 56), (28, 140), (84, 84), (140, 28)]  # (W, H): 24, 32, 20, 36, 20 patches


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """24 short conversations with 0-2 images of different sizes each."""
    root = tmp_path_factory.mktemp("anyres_data")
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"im{k}.png")
    lines = []
    for i in range(24):
        n = i % 3
        images = [f"im{(i + j) % len(SIZES)}.png" for j in range(n)]
        question = "<image>\n" * n + f"What is number {i}?"
        record = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": f"It is {i}."}]}
        if images:
            record["image"] = images if n > 1 else images[0]
        lines.append(json.dumps(record))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def data_config(path, **kw) -> DataConfig:
    args = dict(datasets=[DatasetSpec(str(path))], tokenizer_dir=str(DATA / "tokenizer"), seq_len=SEQ,
                batch_size=ROWS, max_tiles=1, system_prompt="", num_devices=ROWS, num_workers=0,
                num_packing_bins=4, anyres=CFG.vision, max_patches=PATCHES, num_epochs=1, shuffle=False)
    return DataConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def batches(dataset):
    return list(build_dataset(data_config(dataset), 0, 1))


def test_pipeline_packs_text_and_patch_budgets(batches, dataset):
    proc = SailProcessor.from_dir(DATA / "tokenizer", anyres=CFG.vision)
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 24  # every sample, once
    total_patches = 0
    for b in batches:
        check_batch(b, ROWS, SEQ, CFG)
        assert "pixel_values" not in b and set(b) == set(batch_shapes(CFG, ROWS, SEQ, PATCHES))
        # each row's <IMG_CONTEXT> slots match its own packed images' LLM tokens (row-local scatter)
        ctx = (b["input_ids"] == IMG_CONTEXT_TOKEN_ID).sum(axis=1)
        np.testing.assert_array_equal(ctx, b["anyres_token_mask"].sum(axis=1))
        assert (b["anyres_segment_ids"] > 0).sum(axis=1).max() <= PATCHES
        total_patches += int((b["anyres_segment_ids"] > 0).sum())
    want = [proc.preprocess_images([dataset.parent / f"im{k}.png"])["anyres_patches"] for k in range(len(SIZES))]
    per_sample = [sum(len(want[(i + j) % len(SIZES)]) for j in range(i % 3)) for i in range(24)]
    assert total_patches == sum(per_sample)
    # the first image of the first row with images holds the processor's patches of that image
    b = batches[0]
    r = int(np.flatnonzero(b["anyres_token_mask"].any(axis=1))[0])
    n = int((b["anyres_segment_ids"][r] == 1).sum())
    assert any(len(w) == n and np.array_equal(b["anyres_patches"][r, :n], w) for w in want)


def test_train_step_on_8_devices_equals_single_device(batches):
    batch = max(batches, key=lambda b: int(b["anyres_token_mask"].sum()))
    kw = dict(model=CFG, batch_size=ROWS, seq_len=SEQ, steps=4, optimizer=OptimizerConfig(learning_rate=1e-2))
    one = build_program(**kw, mesh={"data": 1}, devices=jax.devices()[:1])
    eight = build_program(**kw, mesh={"data": 8})
    assert eight.mesh.devices.size == 8
    results = []
    for program in (one, eight):
        with use_mesh(program.mesh):
            params = program.init_params(jax.random.PRNGKey(0))
            init = jax.device_get(params)
            state = TrainState(params, program.init_opt_state(params))
            global_batch = to_global(batch, program.mesh, ROWS)
            abstract = abstract_batch(CFG, ROWS, SEQ, PATCHES, program.mesh)
            assert {k: (v.shape, v.dtype) for k, v in global_batch.items()} == {
                k: (v.shape, v.dtype) for k, v in abstract.items()}
            state, metrics = program.step(state, global_batch, np.int32(1), np.float32(1.0))
            results.append((init, *jax.device_get((state.params, metrics))))
    (init, p1, m1), (_, p8, m8) = results
    assert m1["tiles"] > 0 and m1["skipped"] == 0
    for k in ("loss", "grad_norm", "targets", "tokens", "tiles"):
        assert float(m8[k]) == pytest.approx(float(m1[k]), rel=1e-5), k
    # Adam's first update is ~lr * sign(g): where g is ~0, summation-order noise flips it, so the parameters are
    # compared to 1% of the learning rate (loss and gradient norm above match to 1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4, err_msg=jax.tree_util.keystr(path))
    # the ViT was trained through the packed patches (its patch embedding moved)
    before, after = init["vision_model"]["patch_proj"], p1["vision_model"]["patch_proj"]
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_train_cli_anyres_flag(dataset, tmp_path, capsys):
    argv = ["train", "--gin-file=configs/stage/sft.gin", "--gin-file=configs/model/tiny.gin", "--anyres",
            "--gin.DATA=@grain_data", f"--gin.grain_data.datasets=[{{'path': '{dataset}'}}]",
            f"--gin.grain_data.tokenizer_dir='{DATA / 'tokenizer'}'", "--gin.grain_data.max_patches=128",
            f"--gin.WORKDIR='{tmp_path / 'run'}'", "--gin.train.steps=2", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "anyres=True" in out and "max_patches=128" in out
    assert not (tmp_path / "run").exists()


def test_compile_sizes_anyres_rows_by_the_patch_budget():
    from sail_jax.cli.compile import resolve_config

    kwargs, slots = resolve_config(["configs/stage/sft.gin", "configs/model/tiny-anyres.gin"],
                                   ["DATA = @grain_data", "grain_data.max_patches = 256", "train.steps = 1"])
    assert kwargs["model"].vision.anyres and slots == 256
    shapes = batch_shapes(kwargs["model"], 2, 16, slots)
    assert shapes["anyres_patches"] == (2, 256, 588) and shapes["anyres_token_mask"] == (2, 64)


def test_synthetic_anyres_batches_follow_the_contract():
    from sail_jax.training.synthetic import synthetic_data

    cfg = CFG.replace(vision=dataclasses.replace(CFG.vision, image_size=56))  # 4 x 4 patches = 4 LLM tokens a tile
    it = synthetic_data(cfg=cfg, global_batch_size=4, seq_len=32, process_index=0, process_count=1, seed=0,
                        max_tiles=2)
    batch = next(it)
    check_batch(batch, 4, 32, cfg)
    assert batch["anyres_patches"].shape == (4, 32, 588)
    ctx = (batch["input_ids"] == cfg.img_context_token_id).sum(axis=1)
    np.testing.assert_array_equal(ctx, batch["anyres_token_mask"].sum(axis=1))
    assert ctx.sum() > 0


@pytest.mark.parametrize("over_long", ["drop", "truncate"])
def test_patch_budget_drops_or_truncates_before_an_image(dataset, over_long):
    from sail_jax.data.sources import RawRecord
    from sail_jax.data.transforms import SampleTransform

    transform = SampleTransform(tokenizer_dir=str(DATA / "tokenizer"), image_root=str(dataset.parent), dataset=0,
                                seq_len=SEQ, max_tiles=1, system_prompt="", anyres=CFG.vision, max_patches=40,
                                over_long=over_long)
    # im1 (32 patches) fits the 40-patch budget, im3 (36 more) does not
    conv = [{"from": "human", "value": "<image>\nfirst?"}, {"from": "gpt", "value": "A."},
            {"from": "human", "value": "<image>\nsecond?"}, {"from": "gpt", "value": "B."}]
    out = transform.map(RawRecord(json.dumps({"image": ["im1.png", "im3.png"], "conversations": conv}).encode(),
                                  "d.jsonl:1"))
    if over_long == "drop":
        assert out["skip"] == "too_long" and "68 patches (limits 128, 40)" in out["error"]
        return
    assert out["info"]["truncated"] and out["info"]["tiles"] == 32  # patches kept
    np.testing.assert_array_equal(out["anyres_grids"], [[4, 8]])
    assert out["anyres_patches"].shape == (32, 588)
    assert int((out["input_ids"] == IMG_CONTEXT_TOKEN_ID).sum()) == 8
