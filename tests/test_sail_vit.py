"""SailViT vs transformers `Aimv2VisionModel` (the HF-native SAIL-ViT); select_layer; scan layout."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from converters.hf_config import vision_config_from_hf
from converters.load import load_sailvl_checkpoint
from sail_jax.config import RuntimeConfig, get_preset
from sail_jax.models.sail_vit import SailViT
from sail_jax.sharding import abstract_params
from tests.conftest import DATA
from tests.torch_refs import torch_vit_params

LAYERS = 3


@pytest.fixture(scope="module")
def reference():
    """Tiny Aimv2 with SAIL-ViT's settings, perturbed norms, two random 448x448 tiles."""
    torch.manual_seed(0)
    hf_cfg = transformers.Aimv2VisionConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4, image_size=448,
        patch_size=14, rms_norm_eps=1e-5, hidden_act="silu", qkv_bias=False, mlp_bias=False, use_head=False,
        is_native=False, attn_implementation="eager",
    )
    model = transformers.Aimv2VisionModel(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms and conv bias so a mis-mapped tensor cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    pixels = np.random.default_rng(0).standard_normal((2, 3, 448, 448)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), output_hidden_states=True)
    cfg = get_preset("tiny").replace(vision=vision_config_from_hf(hf_cfg.to_dict()))
    hidden = [h.numpy() for h in out.hidden_states]
    return model, cfg, pixels, out.last_hidden_state.numpy(), hidden


@pytest.fixture(scope="module")
def ours(reference):
    """`ours(select_layer, scan)` -> SailViT output on the reference tiles (each variant computed once)."""
    model, cfg, pixels, _, _ = reference
    done = {}

    def run(select_layer: int = -1, scan: bool = False):
        if (select_layer, scan) not in done:
            vit = SailViT(cfg.vision, RuntimeConfig(scan_layers=scan), select_layer)
            abstract = abstract_params(vit, jnp.zeros((1, 3, 448, 448), jnp.float32))["params"]
            params = {"params": jax.tree.map(jnp.asarray, torch_vit_params(model, cfg, abstract, scanned=scan))}
            fwd = jax.jit(lambda p, x: vit.apply(p, x, return_hidden_states=True))
            done[select_layer, scan] = fwd(params, jnp.asarray(pixels))
        return done[select_layer, scan]

    return run


def test_config_read_from_aimv2(reference):
    _, cfg, _, _, _ = reference
    v = cfg.vision
    assert (v.hidden_size, v.intermediate_size, v.num_layers, v.num_heads, v.head_dim) == (64, 96, LAYERS, 4, 16)
    assert (v.grid_size, v.rms_norm_eps, v.qkv_bias, v.use_bias) == (32, 1e-5, False, False)


@pytest.mark.parametrize("scan", [False, True])
def test_last_hidden_state_matches_aimv2(reference, ours, scan):
    ref_last = reference[3]
    out = ours(select_layer=-1, scan=scan)
    assert np.abs(np.asarray(out.last_hidden_state) - ref_last).max() <= 1e-5
    np.testing.assert_array_equal(np.asarray(out.selected), np.asarray(out.last_hidden_state))  # final norm


def test_hidden_states_are_raw_block_outputs(reference, ours):
    ref_hidden = reference[4]
    assert len(ref_hidden) == LAYERS + 1  # transformers prepends the embedding output; SAIL returns blocks only
    out = ours()
    assert len(out.hidden_states) == LAYERS
    for i in range(LAYERS):
        assert np.abs(np.asarray(out.hidden_states[i]) - ref_hidden[i + 1]).max() <= 1e-5, i


@pytest.mark.parametrize("scan", [False, True])
def test_select_layer_is_raw_block_output(reference, ours, scan):
    ref_last, ref_hidden = reference[3], reference[4]
    out = ours(select_layer=-2, scan=scan)
    sel = np.asarray(out.selected)
    assert np.abs(sel - ref_hidden[LAYERS - 2 + 1]).max() <= 1e-5  # block L-2, no final norm
    assert np.abs(sel - ref_last).max() > 1e-2


def test_scanned_equals_unscanned(ours):
    a, b = ours(select_layer=-2), ours(select_layer=-2, scan=True)
    np.testing.assert_allclose(np.asarray(a.last_hidden_state), np.asarray(b.last_hidden_state), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a.selected), np.asarray(b.selected), rtol=0, atol=1e-6)
    for ha, hb in zip(a.hidden_states, b.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(ha), np.asarray(hb), rtol=0, atol=1e-6)


def test_original_implementation_hidden_states():
    """The fixture made by the original code: per-block outputs, select_layer=-2 (= block 0 of 2), final norm."""
    cfg, params = load_sailvl_checkpoint(DATA / "sailvl2-tiny" / "checkpoint")
    inputs, outputs = np.load(DATA / "sailvl2-tiny" / "inputs.npz"), np.load(DATA / "sailvl2-tiny" / "outputs.npz")
    tiles = outputs["vit_hidden_states_tiles"]
    pixels = jnp.asarray(inputs["pixel_values"][tiles])
    vit_params = {"params": jax.tree.map(jnp.asarray, params["params"]["vision_model"])}
    vit = SailViT(cfg.vision, cfg.runtime, select_layer=-2)
    out = jax.jit(lambda p, x: vit.apply(p, x, return_hidden_states=True))(vit_params, pixels)
    for i in range(cfg.vision.num_layers):
        assert np.abs(np.asarray(out.hidden_states[i]) - outputs["vit_hidden_states"][i]).max() <= 1e-5, i
    assert np.abs(np.asarray(out.selected) - outputs["vit_hidden_states"][0]).max() <= 1e-5
    assert np.abs(np.asarray(out.last_hidden_state) - outputs["vit_last_hidden_state"][tiles]).max() <= 1e-5


def test_fixed_path_rejects_other_sizes(reference):
    _, cfg, _, _, _ = reference
    vit = SailViT(cfg.vision)
    with pytest.raises(ValueError, match="448x448"):
        jax.eval_shape(vit.init, jax.random.PRNGKey(0), jnp.zeros((1, 3, 224, 224)))


def test_position_table_starts_as_distinct_2d_sincos_rows():
    """From-scratch init: every grid position gets its own row, as large as the patch-normed tokens, and
    rows depend on y and x separately (so "left" and "top" are both visible to a model trained from scratch)."""
    cfg = dataclasses.replace(get_preset("tiny").vision, image_size=224)
    table = np.asarray(init_pos_embed(cfg))
    g, c = cfg.grid_size, cfg.hidden_size
    assert table.shape == (g * g, c)
    grid = table.reshape(g, g, c)
    assert np.allclose(grid[:, :1, : c // 2], grid[:, 5:6, : c // 2])  # first half: a function of y only
    assert np.allclose(grid[:1, :, c // 2:], grid[5:6, :, c // 2:])  # second half: a function of x only
    dist = np.linalg.norm(table[:, None] - table[None], axis=-1) + np.eye(g * g)
    assert dist.min() > 0.1 and 0.5 < np.sqrt((table**2).mean()) < 1.0


def test_position_table_init_falls_back_for_widths_not_divisible_by_four():
    cfg = dataclasses.replace(get_preset("tiny").vision, hidden_size=66, num_heads=2)
    table = np.asarray(init_pos_embed(cfg))
    assert table.shape == (cfg.num_patches, 66) and np.std(table) < 0.05


def init_pos_embed(vision_cfg):
    vit = SailViT(vision_cfg)
    s = vision_cfg.image_size
    params = jax.jit(vit.init)(jax.random.PRNGKey(0), jnp.zeros((1, 3, s, s), jnp.float32))
    return nn.meta.unbox(params)["params"]["pos_embed"]
