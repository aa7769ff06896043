"""SAIL-ViT-AnyRes: native-resolution images as one packed patch sequence (the packing is our own design).

Everything that depends on an image's patch grid (h, w) is computed here on the host in numpy, as per-patch
gather indices and weights over a row of static `length`, so one jit compilation serves every mix of sizes:

- positions: bicubic resize of the learned G x G table (G = image_size / patch_size = 32) to (h, w), exactly
  as torch `interpolate(mode="bicubic", align_corners=False)` (cubic a = -0.75, clamped border taps). Each
  output position is a 4 x 4 tap stencil, so a patch stores 16 indices into the flattened table and 16
  weights; the device does 16 gathers and a weighted sum (never a [length, 16, C] intermediate).
- axial 2D RoPE positions (row, col), rescaled to the table grid (row * G / h, col * G / w).
- the 2x2 pixel shuffle of each image on its own grid, as the s*s packed-patch indices every LLM token
  concatenates (same channel order as `adapter.pixel_shuffle`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sail_jax.config import VisionConfig
from sail_jax.layers.rope import rope_frequencies

CUBIC_A = -0.75  # torch's bicubic coefficient
TAPS = 16  # 4 x 4 bicubic stencil


@flax.struct.dataclass
class PackedImages:
    """One or more rows of packed AnyRes images (all arrays; `stack_packed` batches rows of `pack_images`).

    patches [B, L, p*p*C] (each vector ordered (kh, kw, c), images row-major one after another);
    segment_ids [B, L] int32 (image k of a row -> k + 1, padding 0); pos_index / pos_weight [B, L, 16]
    (bicubic taps into the flattened position table); rope_pos [B, L, 2] float32 (row, col on the table
    grid); shuffle_index [B, L // s^2, s^2] int32 (row-local patch indices of each LLM token);
    token_mask [B, L // s^2] bool (real LLM tokens, in image order).
    """

    patches: jax.Array
    segment_ids: jax.Array
    pos_index: jax.Array
    pos_weight: jax.Array
    rope_pos: jax.Array
    shuffle_index: jax.Array
    token_mask: jax.Array


def _cubic_taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D bicubic taps ([out, 4] indices, [out, 4] float32 weights), computed in float32 like torch."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    base = np.floor(src)
    t = (src - base).astype(np.float32)
    a = np.float32(CUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    one = np.float32(1)
    weights = np.stack([far(t + one), near(t), near(one - t), far(2 * one - t)], axis=-1).astype(np.float32)
    index = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, in_size - 1).astype(np.int32)
    return index, weights


def bicubic_taps(h: int, w: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a row-major [grid*grid, C] table to (h, w): per output patch, 16 table rows and weights.

    Returns ([h*w, 16] int32, [h*w, 16] float32), tap k = 4 * (row tap) + (col tap).
    """
    iy, wy = _cubic_taps(h, grid)
    ix, wx = _cubic_taps(w, grid)
    index = iy[:, None, :, None] * grid + ix[None, :, None, :]  # [h, w, 4, 4]
    weight = wy[:, None, :, None] * wx[None, :, None, :]
    return index.reshape(h * w, TAPS).astype(np.int32), weight.reshape(h * w, TAPS).astype(np.float32)


def interpolate_positions(table: jax.Array, index: jax.Array, weight: jax.Array) -> jax.Array:
    """table [G*G, C], index/weight [..., 16] -> [..., C] float32 (sum of 16 weighted row gathers)."""
    table = table.astype(jnp.float32)
    out = table[index[..., 0]] * weight[..., 0, None]
    for k in range(1, index.shape[-1]):
        out = out + table[index[..., k]] * weight[..., k, None]
    return out


def grid_rope_positions(h: int, w: int, grid: int) -> np.ndarray:
    """[h*w, 2] float32 (row * grid / h, col * grid / w): the 2D RoPE positions of an (h, w) patch grid."""
    rows = np.arange(h, dtype=np.float32) * np.float32(grid / h)
    cols = np.arange(w, dtype=np.float32) * np.float32(grid / w)
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(h * w, 2)


def axial_rope(rope_pos: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """rope_pos [B, L, 2] -> (cos, sin) [B, L, head_dim] for `layers.rope.apply_rope`.

    Rotate-half layout: dims [0, D/4) and [D/2, 3D/4) rotate with the row, [D/4, D/2) and [3D/4, D) with
    the column, each axis using the frequencies of a D/2-dim RoPE.
    """
    if head_dim % 4:
        raise ValueError(f"axial 2D RoPE needs head_dim divisible by 4; got {head_dim}")
    inv = rope_frequencies(head_dim // 2, theta)
    pos = rope_pos.astype(jnp.float32)
    freqs = jnp.concatenate([pos[..., 0:1] * inv, pos[..., 1:2] * inv], axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def shuffle_taps(h: int, w: int, scale: int, offset: int) -> np.ndarray:
    """[h*w/s^2, s^2] int32: for LLM token (i, j) row-major, patches (s*i + dy, s*j + dx) at `offset`."""
    i, j, dy, dx = np.meshgrid(np.arange(h // scale), np.arange(w // scale), np.arange(scale), np.arange(scale),
                               indexing="ij")
    idx = offset + (scale * i + dy) * w + (scale * j + dx)
    return idx.reshape((h // scale) * (w // scale), scale * scale).astype(np.int32)


def gather_pixel_shuffle(x: jax.Array, shuffle_index: jax.Array) -> jax.Array:
    """x [B, L, C], shuffle_index [B, T, s^2] -> [B, T, s^2 * C], channel (dy*s + dx)*C + c."""
    b, t, k = shuffle_index.shape
    y = jnp.take_along_axis(x, shuffle_index.reshape(b, t * k, 1), axis=1)
    return y.reshape(b, t, k * x.shape[-1])


def patchify(pixels, patch_size: int):
    """[..., C, H, W] (numpy or jax) -> [..., (H/p)*(W/p), p*p*C]: patches row-major, each vector ordered (kh, kw, c),
    so `patchify(x) @ kernel.reshape(p*p*C, D)` equals a stride-p conv with a [kh, kw, C, D] kernel."""
    *lead, c, h, w = pixels.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
    gh, gw, n = h // patch_size, w // patch_size, len(lead)
    x = pixels.reshape(*lead, c, gh, patch_size, gw, patch_size)
    x = x.transpose(*range(n), n + 1, n + 3, n + 2, n + 4, n)  # [..., gh, gw, kh, kw, C]
    return x.reshape(*lead, gh * gw, patch_size * patch_size * c)


def anyres_size(height: int, width: int, cfg: VisionConfig, scale: int = 2) -> tuple[int, int]:
    """Resize target (height, width) of an image, the one AnyRes size rule: aspect ratio kept as far as rounding
    allows, both sides positive multiples of patch*scale (28), between `cfg.min_anyres_patches` and
    `cfg.max_anyres_patches` patches. Sides are rounded to the nearest multiple; only images over the budget shrink
    and only images under the minimum grow (to the smallest size that holds it)."""
    unit = cfg.patch_size * scale
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} must be positive")
    max_pixels = cfg.max_anyres_patches * cfg.patch_size**2
    min_pixels = cfg.min_anyres_patches * cfg.patch_size**2
    if max_pixels < unit * unit:
        raise ValueError(f"max_anyres_patches={cfg.max_anyres_patches} cannot hold one {unit}x{unit} image")
    h, w = max(unit, round(height / unit) * unit), max(unit, round(width / unit) * unit)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(unit, math.floor(height / beta / unit) * unit)
        w = max(unit, math.floor(width / beta / unit) * unit)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / unit) * unit, math.ceil(width * beta / unit) * unit
    while h * w > max_pixels:  # only when a side was clamped up to `unit` (extreme aspect ratios)
        h, w = (h - unit, w) if h >= w else (h, w - unit)
    return h, w


def llm_tokens(grids: np.ndarray | Sequence[tuple[int, int]], scale: int = 2) -> list[int]:
    """LLM tokens of each image from its (h, w) patch grid: (h/s) * (w/s) after the s x s pixel shuffle."""
    return [int(h) // scale * (int(w) // scale) for h, w in np.asarray(grids, np.int64).reshape(-1, 2)]


def check_image_size(height: int, width: int, cfg: VisionConfig, scale: int = 2) -> tuple[int, int]:
    """(h, w) patch grid of a resized image; raises if a side is not a multiple of patch*scale or too big."""
    unit = cfg.patch_size * scale
    if height % unit or width % unit or height <= 0 or width <= 0:
        raise ValueError(
            f"AnyRes image {height}x{width} (HxW): both sides must be positive multiples of {unit} "
            f"(patch {cfg.patch_size} x pixel-shuffle {scale}); resize with `anyres_size` first"
        )
    h, w = height // cfg.patch_size, width // cfg.patch_size
    if h * w > cfg.max_anyres_patches:
        raise ValueError(
            f"AnyRes image {height}x{width} has {h * w} patches > max_anyres_patches={cfg.max_anyres_patches}"
        )
    return h, w


def pack_images(
    images: Sequence[np.ndarray], cfg: VisionConfig, length: int | None = None, scale: int = 2
) -> PackedImages:
    """Pack resized, normalised [C, H, W] images into one row of `length` patches (batch dim 1); see
    `pack_patches`."""
    grids = []
    for k, im in enumerate(images):
        if im.ndim != 3 or im.shape[0] != cfg.num_channels:
            raise ValueError(f"image {k}: expected [C={cfg.num_channels}, H, W], got shape {im.shape}")
        grids.append(check_image_size(im.shape[1], im.shape[2], cfg, scale))
    dim = cfg.patch_size**2 * cfg.num_channels
    patches = [patchify(np.asarray(im, np.float32), cfg.patch_size) for im in images]
    return pack_patches(np.concatenate(patches) if patches else np.zeros((0, dim), np.float32),
                        np.asarray(grids, np.int64).reshape(-1, 2), cfg, length, scale)


def pack_patches(
    patches: np.ndarray, grids: np.ndarray, cfg: VisionConfig, length: int | None = None, scale: int = 2
) -> PackedImages:
    """Patchified images (`patchify` of each, concatenated: [P, p*p*C]) with their (h, w) patch grids [n, 2] -> one
    packed row of `length` patches (batch dim 1). The form samples are stored in (preprocess --anyres, the Grain
    pipeline): segment ids, positions and the shuffle gather all follow from the grids.

    `length` is the static row length (default: the total patch count rounded up to a multiple of s^2);
    choose a fixed value (e.g. max_anyres_patches) to reuse one compilation.
    """
    grids = np.asarray(grids, np.int64).reshape(-1, 2)
    g, dim = cfg.grid_size, cfg.patch_size**2 * cfg.num_channels
    per_token = scale * scale
    for k, (h, w) in enumerate(grids):
        if h <= 0 or w <= 0 or h % scale or w % scale or h * w > cfg.max_anyres_patches:
            raise ValueError(f"image {k}: patch grid {h}x{w} is not positive multiples of {scale} with at most "
                             f"max_anyres_patches={cfg.max_anyres_patches} patches")
    total = int(sum(h * w for h, w in grids))
    if patches.ndim != 2 or patches.shape != (total, dim):
        raise ValueError(f"patches have shape {list(patches.shape)}; the grids {grids.tolist()} need [{total}, {dim}]")
    if length is None:
        length = max(per_token, -(-total // per_token) * per_token)
    if length % per_token:
        raise ValueError(f"packed length {length} is not a multiple of {per_token} (patches per LLM token)")
    if total > length:
        raise ValueError(f"{len(grids)} images have {total} patches in total > packed length {length}")
    n_tok = length // per_token
    out = PackedImages(
        patches=np.zeros((length, dim), np.float32),
        segment_ids=np.zeros((length,), np.int32),
        pos_index=np.zeros((length, TAPS), np.int32),
        pos_weight=np.zeros((length, TAPS), np.float32),
        rope_pos=np.zeros((length, 2), np.float32),
        shuffle_index=np.zeros((n_tok, per_token), np.int32),
        token_mask=np.zeros((n_tok,), bool),
    )
    out.patches[:total] = patches
    start = tok = 0
    for k, (h, w) in enumerate(grids.tolist()):
        n, span = h * w, slice(start, start + h * w)
        out.segment_ids[span] = k + 1
        out.pos_index[span], out.pos_weight[span] = bicubic_taps(h, w, g)
        out.rope_pos[span] = grid_rope_positions(h, w, g)
        out.shuffle_index[tok: tok + n // per_token] = shuffle_taps(h, w, scale, start)
        out.token_mask[tok: tok + n // per_token] = True
        start, tok = start + n, tok + n // per_token
    return jax.tree.map(lambda a: a[None], out)


def stack_packed(rows: Sequence[PackedImages]) -> PackedImages:
    """Rows of `pack_images` (same length) -> one [B, L, ...] batch; `<IMG_CONTEXT>` slots of the text batch are
    filled row-major, i.e. row 0's images first."""
    lengths = {r.segment_ids.shape[1] for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"packed rows have different lengths {sorted(lengths)}; pack them with one `length`")
    return jax.tree.map(lambda *a: np.concatenate(a), *rows)
