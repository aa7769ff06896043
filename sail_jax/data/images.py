"""Image loading, dynamic tiling (InternVL's grid rule), MSAC, normalisation and the AnyRes resize.

Pixel parity with the original processor needs PIL itself: `Image.resize` at its default filter (BICUBIC with
antialiasing for RGB/L/CMYK, NEAREST for "1"/"P", premultiplied alpha for RGBA/LA) rounds to uint8, which no
torch/JAX resize reproduces. Like the HF processor, images are resized in their own mode and every tile is converted
to RGB afterwards; VLMEvalKit converts to RGB first (`load_image(..., convert_rgb=True)`). The two differ for P,
RGBA and LA images. EXIF orientation is not applied, as upstream.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sail_jax.config import VisionConfig
from sail_jax.files import as_path, is_url
from sail_jax.models.anyres import anyres_size

IMAGE_SIZE = 448
PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# VLMEvalKit caps the tiles of one multi-image sample at 64 in total.
TOTAL_MAX_TILES = 64

Grid = tuple[int, int]  # (columns, rows)


# What decoding an untrusted image can raise, whoever reads it (training data, eval TSVs, requests): PIL's
# `DecompressionBombError` (more than 2 x Image.MAX_IMAGE_PIXELS pixels) is not an OSError and must be listed.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(source: str | os.PathLike | bytes | Image.Image, convert_rgb: bool = False) -> Image.Image:
    """Open an image file or encoded bytes (or take a PIL image) and decode it now, so a bad image fails here as a
    ValueError (FileNotFoundError for a missing file), naming the file.

    The mode is kept (HF-processor behaviour); `convert_rgb=True` gives VLMEvalKit's RGB-first behaviour.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, os.PathLike, bytes)):
        what = "image data" if isinstance(source, bytes) else f"image file {source}"
        if not isinstance(source, bytes):
            path = as_path(source) if is_url(source) else Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"image file not found: {source}")
            if is_url(source):  # PIL reads local files; an object is read whole (images are small)
                source = path.read_bytes()
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as opened:
                opened.load()
                image = opened
        except IMAGE_ERRORS as e:
            raise ValueError(f"cannot read {what}: {e}") from e
    else:
        raise TypeError(f"expected an image path, bytes or a PIL image, got {type(source).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has zero size {image.size}")
    return _convert_rgb(image) if convert_rgb else image


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """PIL resize at its default filter, as upstream (`image.resize(size)`), with a clear error for odd modes."""
    try:
        return image.resize(size)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot resize an image of mode {image.mode!r}: {e}") from e


def _convert_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert an image of mode {image.mode!r} to RGB: {e}") from e


def candidate_grids(min_num: int, max_num: int) -> list[Grid]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, in upstream order.

    Upstream stable-sorts a Python set by cols*rows; the set's iteration order decides exact aspect-ratio ties between
    grids with equal tile counts, so the set is built with the same expression here.
    """
    if not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(grids, key=lambda g: g[0] * g[1])


def find_closest_grid(width: int, height: int, grids: list[Grid], image_size: int = IMAGE_SIZE) -> Grid:
    """Grid with the aspect ratio closest to width/height; on an exact tie a later (larger) grid wins only if the
    image has more than half its pixel area (`W*H > 0.5*S^2*i*j`). An empty candidate list gives (1, 1)."""
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best: Grid = (1, 1)
    for grid in grids:
        diff = abs(aspect_ratio - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * image_size * image_size * grid[0] * grid[1]:
            best = grid
    return best


def crop_grid(image: Image.Image, grid: Grid, image_size: int = IMAGE_SIZE) -> list[Image.Image]:
    """Resize the whole image to (S*cols, S*rows) and cut it into cols*rows tiles, row-major."""
    cols, rows = grid
    resized = _resize(image, (image_size * cols, image_size * rows))
    tiles = []
    for k in range(cols * rows):
        x, y = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    return tiles


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> tuple[list[Image.Image], Grid]:
    """InternVL/SAIL-VL2 dynamic tiling: tiles of the closest grid, then a thumbnail last if there is more than one."""
    width, height = image.size
    grid = find_closest_grid(width, height, candidate_grids(min_num, max_num), image_size)
    tiles = crop_grid(image, grid, image_size)
    if use_thumbnail and len(tiles) != 1:
        tiles.append(_resize(image, (image_size, image_size)))
    return tiles, grid


def msac_preprocess(
    image: Image.Image, max_num: int = 12, image_size: int = IMAGE_SIZE
) -> tuple[list[Image.Image], Grid, Grid]:
    """Multi-scale tiling (MSAC, single images only): grid g1 tiles, then tiles of the closest grid g2 that g1 does not
    subdivide (i1 % i or j1 % j non-zero), then g1's thumbnail (or the single tile when g1 = (1, 1)).
    Returns (tiles, g1, g2)."""
    first, g1 = dynamic_preprocess(image, 1, max_num, image_size, use_thumbnail=True)
    others = [g for g in candidate_grids(1, max_num) if g1[0] % g[0] != 0 or g1[1] % g[1] != 0]
    g2 = find_closest_grid(image.width, image.height, others, image_size)
    return first[:-1] + crop_grid(image, g2, image_size) + first[-1:], g1, g2


def normalize_tile(
    tile: Image.Image, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> np.ndarray:
    """RGB conversion, ToTensor (/255, CHW) and Normalize, all in float32 as torchvision computes them."""
    x = np.asarray(_convert_rgb(tile), dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    mean_ = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_ = np.asarray(std, dtype=np.float32)[:, None, None]
    return (x - mean_) / std_


@dataclass(frozen=True)
class TiledImage:
    """One image after tiling: pixel_values [T,3,S,S] float32, grid (cols, rows) of the first tiling, size (w, h)."""

    pixel_values: np.ndarray
    grid: Grid
    size: tuple[int, int]

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


def preprocess_image(
    image: Image.Image,
    max_num: int = 10,
    min_num: int = 1,
    msac: bool = False,
    image_size: int = IMAGE_SIZE,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> TiledImage:
    """Tile (plain or MSAC) and normalise one image, as the original image processor's `load_image[_msac]`."""
    if msac:
        if min_num != 1:
            raise ValueError("MSAC always tiles with min_num=1 (as upstream)")
        tiles, grid, _ = msac_preprocess(image, max_num, image_size)
    else:
        tiles, grid = dynamic_preprocess(image, min_num, max_num, image_size, use_thumbnail=True)
    pixels = np.stack([normalize_tile(t, mean, std) for t in tiles])
    return TiledImage(pixel_values=pixels, grid=grid, size=image.size)


_VLMEVAL_MAX_NUM = (
    (12, ("ChartQA_TEST", "MMMU_DEV_VAL", "MMMU_TEST", "MME-RealWorld", "VCR_EN", "VCR_ZH", "OCRVQA")),
    (18, ("DocVQA_VAL", "DocVQA_TEST", "DUDE", "MMLongBench_DOC", "SLIDEVQA")),
    (24, ("InfoVQA_VAL", "InfoVQA_TEST", "OCRBench", "HRBench4K", "HRBench8K")),
)


def vlmevalkit_max_num(dataset: str | None, video: bool = False) -> int:
    """VLMEvalKit's per-dataset tile limit; names match as substrings of the dataset name, as there (`listinstr`)."""
    if dataset is None:
        return 10
    if video:
        return 1
    for max_num, names in _VLMEVAL_MAX_NUM:
        if any(name in dataset for name in names):
            return max_num
    return 10


def multi_image_max_num(max_num: int, n_images: int, total: int = TOTAL_MAX_TILES) -> int:
    """Per-image tile limit when n images share VLMEvalKit's total budget: max(1, min(max_num, total // n))."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    return max(1, min(max_num, total // n_images))


def anyres_preprocess(
    image: Image.Image,
    cfg: VisionConfig,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize one image by the AnyRes rule (`models.anyres.anyres_size`; PIL default filter, own mode, then RGB) and
    normalise it, ready for `models.anyres.pack_images`.

    Returns (pixels [3,H,W] float32, (H/patch, W/patch) patch grid)."""
    h, w = anyres_size(image.height, image.width, cfg)
    pixels = normalize_tile(_resize(image, (w, h)), mean, std)
    return pixels, (h // cfg.patch_size, w // cfg.patch_size)
