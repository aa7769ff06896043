"""Image side: dynamic tiling (grid choice, tie rule, crops, thumbnail), MSAC, modes, load errors, fixture pixel parity,
VLMEvalKit tile limits, the AnyRes resize and patchify."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from sail_jax.config import VisionConfig
from sail_jax.data import images as im
from sail_jax.models.anyres import patchify

FIXTURE = "sailvl2-tiny"


def solid(w: int, h: int, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (w, h))


# (W, H, max_num) -> grid, tiles incl. thumbnail, MSAC tiles, as the original processor tiles them.
TABLE = [
    (700, 300, 10, (5, 2), 11, 13),
    (448, 448, 10, (1, 1), 1, 5),
    (896, 896, 10, (2, 2), 5, 14),
    (800, 600, 10, (3, 2), 7, 11),
    (800, 600, 12, (4, 3), 13, None),
    (1920, 1080, 10, (4, 2), 9, 15),
]


@pytest.mark.parametrize("w,h,max_num,grid,tiles,msac_tiles", TABLE)
def test_reference_table(w, h, max_num, grid, tiles, msac_tiles):
    image = solid(w, h)
    got_tiles, got_grid = im.dynamic_preprocess(image, max_num=max_num)
    assert got_grid == grid
    assert len(got_tiles) == tiles
    assert all(t.size == (448, 448) for t in got_tiles)
    if msac_tiles is not None:
        assert len(im.msac_preprocess(image, max_num)[0]) == msac_tiles


def test_candidate_grids_cover_all_products_in_order():
    grids = im.candidate_grids(1, 12)
    brute = {(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12}
    assert len(grids) == len(set(grids)) and set(grids) == brute
    assert [i * j for i, j in grids] == sorted(i * j for i, j in grids)
    assert im.candidate_grids(4, 6)[0][0] * im.candidate_grids(4, 6)[0][1] == 4
    with pytest.raises(ValueError, match="min_num"):
        im.candidate_grids(3, 2)


@pytest.mark.parametrize(
    "w,h,max_num,grid",
    [
        # 3:2 is exactly between (1,1) and (2,1); (2,1) wins only if W*H > 0.5*448^2*2 = 200704.
        (600, 400, 2, (2, 1)),
        (300, 200, 2, (1, 1)),
        # Squares tie between (1,1), (2,2), (3,3): (2,2) needs W*H > 401408, (3,3) needs > 903168.
        (634, 634, 10, (2, 2)),
        (633, 633, 10, (1, 1)),
        (951, 951, 10, (3, 3)),
        (950, 950, 10, (2, 2)),
    ],
)
def test_tie_rule_both_ways(w, h, max_num, grid):
    assert im.dynamic_preprocess(solid(w, h), max_num=max_num)[1] == grid


def test_single_tile_has_no_thumbnail_and_min_num():
    tiles, grid = im.dynamic_preprocess(solid(300, 280), max_num=10)
    assert grid == (1, 1) and len(tiles) == 1
    tiles, grid = im.dynamic_preprocess(solid(300, 280), min_num=2, max_num=10)
    assert grid[0] * grid[1] >= 2 and len(tiles) == grid[0] * grid[1] + 1
    tiles, grid = im.dynamic_preprocess(solid(100, 2000), max_num=10)
    assert grid == (1, 10) and len(tiles) == 11


def test_crop_geometry_row_major_thumbnail_last():
    # 1344x896 = exactly 3x2 tiles, so the resize is the identity and each tile must be one colour block.
    colours = [(10 * k, 255 - 20 * k, 7 * k) for k in range(6)]
    image = Image.new("RGB", (1344, 896))
    for k, c in enumerate(colours):
        image.paste(c, ((k % 3) * 448, (k // 3) * 448, (k % 3 + 1) * 448, (k // 3 + 1) * 448))
    tiles, grid = im.dynamic_preprocess(image, max_num=10)
    assert grid == (3, 2) and len(tiles) == 7
    for k, c in enumerate(colours):
        assert np.all(np.asarray(tiles[k]) == np.array(c, np.uint8)), k
    np.testing.assert_array_equal(np.asarray(tiles[-1]), np.asarray(image.resize((448, 448), Image.BICUBIC)))


def test_msac_structure():
    image = Image.linear_gradient("L").resize((700, 300)).convert("RGB")
    tiles, g1, g2 = im.msac_preprocess(image, max_num=10)
    assert (g1, g2) == ((5, 2), (2, 1))
    plain, _ = im.dynamic_preprocess(image, max_num=10)
    second = im.crop_grid(image, g2)
    arrays = [np.asarray(t) for t in tiles]
    expected = [np.asarray(t) for t in plain[:-1] + second + plain[-1:]]
    assert len(arrays) == len(expected) == 13
    for a, b in zip(arrays, expected):
        np.testing.assert_array_equal(a, b)
    # A (1,1) first grid: the second grid's tiles, then the single tile (no thumbnail); g2 never divides g1.
    tiles, g1, g2 = im.msac_preprocess(solid(448, 448), max_num=10)
    assert g1 == (1, 1) and g2 == (2, 2) and len(tiles) == 5


def test_normalisation_values():
    tile = Image.new("RGB", (448, 448), (0, 128, 255))
    x = im.normalize_tile(tile)
    assert x.shape == (3, 448, 448) and x.dtype == np.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), im.IMAGENET_MEAN, im.IMAGENET_STD)]
    np.testing.assert_allclose(x[:, 5, 7], expected, rtol=1e-6)


def test_fixture_pixel_parity(data_dir):
    ref = np.load(data_dir / FIXTURE / "preprocess_reference.npz")
    out = im.preprocess_image(im.load_image(data_dir / FIXTURE / "images" / "image_0.png"), max_num=10)
    assert out.pixel_values.dtype == np.float32
    np.testing.assert_allclose(out.pixel_values, ref["pixel_values_fp32_before_bf16_cast"], rtol=0, atol=1e-5)
    # The original processor casts to bfloat16 (round to nearest even): compare within one bf16 step.
    bf16 = out.pixel_values.astype(ml_dtypes.bfloat16).astype(np.float32)
    with np.errstate(divide="ignore"):
        step = 2.0 ** (np.floor(np.log2(np.abs(ref["pixel_values"]))) - 7)  # bf16 spacing; 0 where the value is 0
    assert np.all(np.abs(bf16 - ref["pixel_values"]) <= step)
    assert [out.num_tiles] == ref["num_patches_list"].tolist()
    assert [list(out.grid)] == ref["tile_grids"].tolist()
    assert [list(out.size)] == ref["image_sizes"].tolist()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1", "I;16"])
def test_modes_tile_in_own_mode_then_rgb(mode):
    rgb = Image.linear_gradient("L").resize((700, 300)).convert("RGB")
    image = rgb.convert(mode)
    if mode in ("RGBA", "LA"):
        image.putalpha(Image.linear_gradient("L").rotate(90).resize((700, 300)))
    tiles, grid = im.dynamic_preprocess(image, max_num=4)
    assert grid == (2, 1) and {t.mode for t in tiles} == {mode}
    out = im.preprocess_image(image, max_num=4)
    assert out.pixel_values.shape == (3, 3, 448, 448) and np.isfinite(out.pixel_values).all()
    expected = [im.normalize_tile(t.convert("RGB")) for t in tiles]
    np.testing.assert_array_equal(out.pixel_values, np.stack(expected))
    if mode == "L":
        gray = out.pixel_values[:, 0] * 0.229 + 0.485
        np.testing.assert_allclose(gray, out.pixel_values[:, 1] * 0.224 + 0.456, atol=1e-6)


def test_rgba_resized_in_own_mode_differs_from_rgb_first():
    # HF processor: premultiplied RGBA resize, then RGB; VLMEvalKit: RGB first. Hard alpha edges make them differ.
    image = Image.new("RGBA", (700, 300), (255, 0, 0, 255))
    image.paste((0, 255, 0, 0), (0, 0, 350, 300))
    own = im.preprocess_image(image, max_num=4).pixel_values
    rgb_first = im.preprocess_image(im.load_image(image, convert_rgb=True), max_num=4).pixel_values
    assert own.shape == rgb_first.shape and not np.array_equal(own, rgb_first)


def test_load_errors_name_the_file(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        im.load_image(tmp_path / "nope.png")
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match="corrupt.png"):
        im.load_image(bad)
    truncated = tmp_path / "truncated.png"
    png = (data_dir / FIXTURE / "images" / "image_0.png").read_bytes()
    truncated.write_bytes(png[: len(png) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        im.load_image(truncated)
    with pytest.raises(TypeError):
        im.load_image(123)
    cmyk = tmp_path / "cmyk.jpg"
    solid(640, 480, "CMYK").save(cmyk)
    loaded = im.load_image(cmyk)
    assert loaded.mode == "CMYK" and im.load_image(cmyk, convert_rgb=True).mode == "RGB"


def test_vlmevalkit_tile_limits():
    assert im.vlmevalkit_max_num(None) == 10
    assert im.vlmevalkit_max_num("MMBench_DEV_EN") == 10
    assert im.vlmevalkit_max_num("MMMU_DEV_VAL") == 12
    assert im.vlmevalkit_max_num("MME-RealWorld-CN") == 12
    assert im.vlmevalkit_max_num("DocVQA_TEST") == 18
    assert im.vlmevalkit_max_num("OCRBench") == 24
    assert im.vlmevalkit_max_num("Video-MME", video=True) == 1
    assert [im.multi_image_max_num(10, n) for n in (1, 2, 7, 8, 64, 65)] == [10, 10, 9, 8, 1, 1]
    assert im.multi_image_max_num(24, 2) == 24 and im.multi_image_max_num(24, 3) == 21
    with pytest.raises(ValueError):
        im.multi_image_max_num(10, 0)


def test_anyres_preprocess_and_patchify_match_a_conv():
    image = Image.linear_gradient("L").resize((100, 80)).convert("RGB")
    pixels, grid = im.anyres_preprocess(image, VisionConfig())
    assert pixels.shape == (3, 84, 112) and grid == (6, 8)
    patches = patchify(pixels, 14)
    assert patches.shape == (48, 588)
    # Element mapping: patch (r, c) in row-major order, vector index (kh*14 + kw)*3 + ch.
    r, c, kh, kw, ch = 4, 5, 3, 11, 2
    assert patches[r * 8 + c, (kh * 14 + kw) * 3 + ch] == pixels[ch, r * 14 + kh, c * 14 + kw]
    kernel = np.random.default_rng(0).standard_normal((14, 14, 3, 5)).astype(np.float32)
    conv = jax.lax.conv_general_dilated(
        pixels[None], kernel, window_strides=(14, 14), padding="VALID", dimension_numbers=("NCHW", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(patches @ kernel.reshape(-1, 5), np.asarray(conv).reshape(48, 5), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="multiple"):
        patchify(np.zeros((3, 20, 28), np.float32), 14)
