"""SAIL-ViT-AnyRes through the host paths: the one size rule, the processor's packed patches and token counts,
`sail-jax preprocess --anyres` (and `forward` on its file), the engine (greedy tokens equal a full-recompute loop)
and `sail-jax eval` / `sail-jax generate` on an AnyRes checkpoint."""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from converters.convert import open_source, write_ours
from converters.load import load_checkpoint
from converters.model_config import config_dict_differences, model_config_to_dict
from sail_jax.cli import main
from sail_jax.config import IMG_CONTEXT_TOKEN_ID, IMG_END_TOKEN_ID, IMG_START_TOKEN_ID, RuntimeConfig, VisionConfig
from sail_jax.data.images import anyres_preprocess
from sail_jax.data.processor import SailProcessor
from sail_jax.inference.engine import Engine, Request
from sail_jax.inference.sampling import SamplingParams
from sail_jax.models.anyres import anyres_size, llm_tokens, pack_patches, patchify
from sail_jax.models.sail_vl import SailVL
from tests.conftest import DATA
from tests.greedy_reference import greedy_full_recompute
from tests.test_eval import png_b64, write_tsv

CKPT = DATA / "sailvl2-tiny" / "checkpoint"
SIZES = [(90, 60), (70, 130), (200, 200)]  # (W, H) -> grids (h, w) 4x6, 10x4, 14x14


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("aspect", [1 / 20, 1 / 7, 1 / 3, 9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9, 3.0, 7.0, 20.0])
@pytest.mark.parametrize("area", [50**2, 640 * 480, 1792**2, 4000 * 3000])
def test_sizes_keep_aspect_within_the_1792_budget(aspect, area):
    w, h = max(1, round((area * aspect) ** 0.5)), max(1, round((area / aspect) ** 0.5))
    th, tw = anyres_size(h, w, VisionConfig())
    assert th % 28 == 0 and tw % 28 == 0 and th >= 28 and tw >= 28
    assert th * tw <= 1792 * 1792  # 16,384 patches = 4,096 LLM tokens at most
    if area > 1792**2:  # shrunk to nearly fill the budget, never more
        assert th * tw > 0.8 * 1792**2
    if min(w, h) >= 56:  # rounding to 28 px keeps the aspect ratio close
        assert abs((tw / th) / (w / h) - 1) < 0.35
    if w * h <= 1792**2 and min(w, h) >= 28 and max(w, h) <= 1792:  # under the budget: only rounded
        assert (th, tw) == (round(h / 28) * 28, round(w / 28) * 28)


def test_1792_cap_and_minimum():
    cfg = VisionConfig()
    assert anyres_size(1792, 1792, cfg) == (1792, 1792)
    assert anyres_size(3584, 3584, cfg) == (1792, 1792)
    assert anyres_size(1800, 1800, cfg) == (1792, 1792)
    assert anyres_size(896, 3584, cfg) == (896, 3584)  # 1/4 aspect at the budget: 32 x 128 patches
    assert anyres_size(10, 10, cfg) == (28, 28)  # the default minimum: one LLM token
    small = dataclasses.replace(cfg, min_anyres_patches=64)  # at least 112x112 pixels
    assert anyres_size(10, 10, small) == (112, 112)
    assert anyres_size(30, 60, small) == (84, 168)  # grown to the minimum, aspect kept, no further
    assert anyres_size(300, 300, small) == (308, 308)  # above the minimum: only rounded


@pytest.fixture(scope="module")
def anyres_cfg():
    cfg, _ = load_checkpoint(CKPT, RuntimeConfig())
    return cfg.replace(vision=dataclasses.replace(cfg.vision, anyres=True, max_anyres_patches=1024))


@pytest.fixture(scope="module")
def processor(anyres_cfg):
    return SailProcessor.from_dir(CKPT, anyres=anyres_cfg.vision)


def test_processor_packs_native_resolution_patches(processor, anyres_cfg):
    images = [_image(w, h, k) for k, (w, h) in enumerate(SIZES)]
    enc = processor(images=images, prompt="Describe the images.")
    np.testing.assert_array_equal(enc["anyres_grids"], [[4, 6], [10, 4], [14, 14]])
    np.testing.assert_array_equal(enc["image_sizes"], SIZES)
    want = [patchify(anyres_preprocess(im, anyres_cfg.vision)[0], 14) for im in images]
    np.testing.assert_array_equal(enc["anyres_patches"], np.concatenate(want))
    ids = enc["input_ids"][0]
    assert "pixel_values" not in enc
    assert llm_tokens(enc["anyres_grids"]) == [6, 10, 49]  # (h/28)*(w/28)
    assert int(np.sum(ids == IMG_CONTEXT_TOKEN_ID)) == 65
    assert int(np.sum(ids == IMG_START_TOKEN_ID)) == 3 == int(np.sum(ids == IMG_END_TOKEN_ID))
    starts, ends = np.flatnonzero(ids == IMG_START_TOKEN_ID), np.flatnonzero(ids == IMG_END_TOKEN_ID)
    assert (ends - starts - 1).tolist() == [6, 10, 49]  # <img> + that many <IMG_CONTEXT> + </img>


def test_packed_features_equal_per_image_features(processor, anyres_cfg):
    model = SailVL(anyres_cfg)
    _, params = load_checkpoint(CKPT, RuntimeConfig())
    enc = processor.preprocess_images([_image(w, h, k) for k, (w, h) in enumerate(SIZES)])
    feats = jax.jit(lambda p, x: model.apply(p, x, method="extract_feature_packed"))
    length = anyres_cfg.vision.max_anyres_patches  # one compiled shape for the packed row and every image alone
    packed, mask = feats(params, pack_patches(enc["anyres_patches"], enc["anyres_grids"], anyres_cfg.vision, length))
    packed = np.asarray(packed)[np.asarray(mask)]
    start = tok = 0
    for h, w in enc["anyres_grids"]:
        alone, m = feats(params, pack_patches(enc["anyres_patches"][start:start + h * w], [[h, w]],
                                              anyres_cfg.vision, length))
        alone = np.asarray(alone)[np.asarray(m)]
        assert len(alone) == h * w // 4
        assert np.abs(packed[tok:tok + len(alone)] - alone).max() <= 1e-5
        start, tok = start + h * w, tok + len(alone)
    assert tok == len(packed)


def test_preprocess_cli_writes_packed_patches(tmp_path, capsys, processor):
    paths = []
    for k, (w, h) in enumerate(SIZES[:2]):
        paths.append(tmp_path / f"im{k}.png")
        _image(w, h, k).save(paths[-1])
    out = tmp_path / "in.npz"
    args = ["preprocess", "--tokenizer", str(CKPT), "--prompt", "Compare <image> and <image>.", "--anyres",
            "--out", str(out)] + [a for p in paths for a in ("--image", str(p))]
    assert main(args) == 0
    assert "64 patches [56x84, 140x56]" in capsys.readouterr().out
    data = dict(np.load(out))
    assert sorted(data) == ["anyres_grids", "anyres_patches", "image_sizes", "input_ids"]
    want = processor(images=[str(p) for p in paths], prompt="Compare <image> and <image>.")
    for key in data:
        np.testing.assert_array_equal(data[key], want[key], err_msg=key)
    assert data["anyres_patches"].shape == (24 + 40, 14 * 14 * 3) and data["input_ids"].shape[0] == 1
    # `forward` runs the (tile) checkpoint's ViT on the packed patches: the context slots hold the adapter tokens
    res = tmp_path / "out.npz"
    assert main(["forward", "--checkpoint", str(CKPT), "--inputs", str(out), "--out", str(res)]) == 0
    fwd = np.load(res)
    ctx = data["input_ids"][0] == IMG_CONTEXT_TOKEN_ID
    assert fwd["adapter_output"].shape[0] == 6 + 10 == ctx.sum()
    np.testing.assert_array_equal(fwd["inputs_embeds"][0][ctx], fwd["adapter_output"])
    assert main(["preprocess", "--tokenizer", str(CKPT), "--prompt", "x", "--anyres", "--max-tiles", "2",
                 "--out", str(tmp_path / "bad.npz")]) == 2
    assert not (tmp_path / "bad.npz").exists()


def _bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_engine_greedy_equals_full_recompute(processor, anyres_cfg):
    _, params = load_checkpoint(CKPT, RuntimeConfig())
    model = SailVL(anyres_cfg)
    engine = Engine(model, params, decode_steps=4)
    encs = [processor(images=[_image(90, 60, 1), _image(70, 130, 2)], prompt="What is shown?"),
            processor(prompt="Say something."),
            processor(images=[_image(200, 200, 3)], prompt="Describe it in detail.")]
    requests = [Request.from_encoding(e) for e in encs]
    assert requests[0].anyres_grids is not None and requests[1].anyres_grids is None
    outs = engine.generate(requests, SamplingParams(max_new_tokens=6))
    for enc, out in zip(encs, outs):
        images = None
        if len(enc["anyres_grids"]):
            images = pack_patches(_bf16(enc["anyres_patches"]), enc["anyres_grids"], anyres_cfg.vision)
        want, _ = greedy_full_recompute(model, params, enc["input_ids"][0], None, 6, images=images)
        assert out.token_ids == want
    tiles = Request(encs[1]["input_ids"][0], np.zeros((1, 3, 448, 448), np.float32))
    with pytest.raises(ValueError, match="request 0: has tiles .* the model is AnyRes"):
        engine.generate([tiles], SamplingParams(max_new_tokens=1))
    wrong = dataclasses.replace(requests[2], anyres_grids=np.array([[14, 12]]))
    with pytest.raises(ValueError, match=r"49 <IMG_CONTEXT> tokens but 42 image features"):
        engine.generate([wrong], SamplingParams(max_new_tokens=1))


@pytest.fixture(scope="module")
def anyres_checkpoint(tmp_path_factory, anyres_cfg):
    """The tiny fixture's weights as our checkpoint with an AnyRes config (the parameters are the same)."""
    cfg, source = open_source(CKPT)
    dst = tmp_path_factory.mktemp("anyres") / "checkpoint"
    write_ours(source, cfg.replace(vision=anyres_cfg.vision), dst, progress=False, tokenizer=CKPT)
    return dst


def test_eval_and_generate_on_an_anyres_checkpoint(anyres_checkpoint, tmp_path, capsys):
    red, blue = png_b64("red", size=(96, 64)), png_b64("blue", "square", size=(64, 120))
    rows = [{"index": 0, "image": red, "question": "What colour?", "A": "red", "B": "blue", "answer": "A"},
            {"index": 1, "image": json.dumps([red, blue]), "question": "Which has the circle?", "A": "first",
             "B": "second", "answer": "A"}]
    write_tsv(tmp_path / "Shapes.tsv", rows)
    out = tmp_path / "res.json"
    assert main(["eval", "--checkpoint", str(anyres_checkpoint), "--data", str(tmp_path / "Shapes.tsv"), "--kind",
                 "mcq", "--max-new-tokens", "2", "--out", str(out)]) == 0
    items = json.loads(out.read_text())["items"]
    assert [i["error"] for i in items] == [None, None] and all(i["prompt"] for i in items)
    capsys.readouterr()
    image = tmp_path / "red.png"
    _image(90, 60, 1).save(image)
    assert main(["generate", "--checkpoint", str(anyres_checkpoint), "--prompt", "What is shown?", "--image",
                 str(image), "--max-new-tokens", "3", "--print-ids"]) == 0
    ids = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(ids) == 3


def test_anyres_input_settings_do_not_change_the_architecture(anyres_cfg):
    """A tile checkpoint seeds (or soups with) an AnyRes run: the image-input fields are not architecture."""
    tiles = anyres_cfg.replace(vision=dataclasses.replace(anyres_cfg.vision, anyres=False, max_anyres_patches=16384))
    a, b = model_config_to_dict(tiles), model_config_to_dict(anyres_cfg)
    assert config_dict_differences(a, b) == []
    rope = model_config_to_dict(anyres_cfg.replace(vision=dataclasses.replace(anyres_cfg.vision, use_2d_rope=True)))
    assert config_dict_differences(a, rope) == ["vision.use_2d_rope: False (checkpoint) vs True (config)"]


def test_rl_filter_on_an_anyres_checkpoint(anyres_checkpoint, tmp_path):
    """RL prompts with images on an AnyRes checkpoint: the rollouts send native-resolution patches (the engine's
    request from the processor's encoding), not tiles."""
    _image(90, 60, 1).save(tmp_path / "red.png")
    rows = [{"id": "i", "question": "How many shapes?", "answer": "1", "kind": "count", "image": "red.png"},
            {"id": "t", "question": "(A) one (B) two", "answer": "B", "kind": "mcq"}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "kept.jsonl"
    assert main(["rl-filter", "--checkpoint", str(anyres_checkpoint), "--data", str(data), "--k", "2", "--out",
                 str(out), "--max-new-tokens", "3"]) == 0
    scores = [json.loads(line) for line in (tmp_path / "kept.jsonl.passk.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scores] == ["i", "t"] and all(s["pass_at_k"] in (0, 0.5, 1) for s in scores)
