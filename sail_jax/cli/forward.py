"""`sail-jax forward`: run a checkpoint on preprocessed inputs and write fixture-style arrays."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sail_jax.cli._common import CHECKPOINT_HELP, checkpoint_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forward", help="numerics entry point: ViT/adapter/embeds/logits statistics to .npz")
    p.add_argument("--checkpoint", required=True, type=checkpoint_arg, help=CHECKPOINT_HELP)
    p.add_argument("--inputs", required=True,
                   help=".npz with input_ids [1,N] and pixel_values [T,3,448,448], or AnyRes anyres_patches + "
                        "anyres_grids (`preprocess --anyres`; the checkpoint then runs its ViT at native resolution)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter/compute dtype")
    p.add_argument("--positions", default=None, help="comma-separated positions for full logits (default: last 4)")
    p.set_defaults(func=run)


def load_inputs(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        data = np.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such inputs file") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    if "input_ids" not in data:
        raise ValueError(f"{path}: missing array 'input_ids'")
    ids = np.asarray(data["input_ids"])
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"{path}: input_ids must have shape [1, N], got {list(ids.shape)}")
    pix = np.asarray(data["pixel_values"], np.float32) if "pixel_values" in data else None
    if pix is not None and (pix.ndim != 4 or pix.shape[1] != 3):
        raise ValueError(f"{path}: pixel_values must have shape [T, 3, H, W], got {list(pix.shape)}")
    return ids, pix


def save_npz_atomic(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary file beside `path`, then rename: a failure never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        np.savez(tmp, **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_anyres(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(anyres_patches [P, D], anyres_grids [n, 2]) of an `preprocess --anyres` file, or None for a tile file."""
    data = np.load(path)
    if "anyres_grids" not in data:
        return None
    if "anyres_patches" not in data:
        raise ValueError(f"{path}: has anyres_grids but no anyres_patches")
    return np.asarray(data["anyres_patches"], np.float32), np.asarray(data["anyres_grids"], np.int64)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from converters.load import load_checkpoint
    from sail_jax.config import RuntimeConfig
    from sail_jax.inference.forward import forward_outputs
    from sail_jax.models.anyres import llm_tokens, pack_patches
    from sail_jax.models.sail_vl import SailVL

    ids, pix = load_inputs(args.inputs)
    anyres = load_anyres(args.inputs)
    positions = [int(t) for t in args.positions.split(",")] if args.positions else None
    cfg, params = load_checkpoint(args.checkpoint, RuntimeConfig(dtype=args.dtype, param_dtype=args.dtype))
    n_ctx, images = int((ids == cfg.img_context_token_id).sum()), None
    if anyres is not None:  # the checkpoint's ViT at native resolution (any SAIL-ViT runs AnyRes)
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, anyres=True))
        want = sum(llm_tokens(anyres[1]))
        if n_ctx != want:
            raise ValueError(f"{args.inputs}: {n_ctx} <IMG_CONTEXT> tokens but {want} AnyRes image tokens "
                             f"(grids {anyres[1].tolist()})")
        try:
            images = pack_patches(*anyres, cfg.vision)
        except ValueError as e:
            raise ValueError(f"{args.inputs}: {e}") from None
    elif n_ctx != (n_feat := 0 if pix is None else pix.shape[0] * cfg.tokens_per_tile):
        raise ValueError(
            f"{args.inputs}: {n_ctx} <IMG_CONTEXT> tokens but {n_feat} image features "
            f"({0 if pix is None else pix.shape[0]} tiles x {cfg.tokens_per_tile})"
        )
    out = forward_outputs(SailVL(cfg), params, ids, pix, positions, images=images)
    save_npz_atomic(args.out, out)
    print(f"wrote {args.out}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in out.items()))
    return 0
