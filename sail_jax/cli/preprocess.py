"""`sail-jax preprocess`: images or a video + prompt -> inputs.npz (input_ids, pixel_values, tile bookkeeping), host
side only. A video writes input_ids [1,L], pixel_values [N,3,S,S], num_patches_list [N] (all 1) and frame_indices
[N]. `--anyres` (SAIL-ViT-AnyRes) writes input_ids [1,L], the images' patches packed into one sequence
anyres_patches [P,14*14*3], their patch grids anyres_grids [n,2] (H/14, W/14) and image_sizes [n,2] (w, h)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from sail_jax.cli._common import add_video_args, load_video_arg
from sail_jax.files import apply_umask


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess",
        help="tile images and tokenize a one-turn prompt as the original SAIL-VL2 processor, write an .npz",
    )
    p.add_argument("--tokenizer", required=True,
                   help="directory with vocab.json + merges.txt (or tokenizer.json) and preprocessor_config.json")
    p.add_argument("--image", action="append", default=[], type=Path,
                   help="image file; repeat for several images, in order")
    p.add_argument("--prompt", required=True, help="user text; <image> markers place the images, else they go first")
    p.add_argument("--system", default=None, help="system prompt (default: the SAIL-VL2 Chinese one; '' for none)")
    p.add_argument("--max-tiles", type=int, default=None,
                   help="max tiles per image before the thumbnail (default: preprocessor_config.json, 10)")
    p.add_argument("--thinking", action="store_true", help="append the CoT (thinking-mode) instruction to the prompt")
    p.add_argument("--msac", action="store_true", help="multi-scale tiling (single image only)")
    p.add_argument("--anyres", action="store_true",
                   help="SAIL-ViT-AnyRes: no tiles; each image at native resolution (aspect kept, sides multiples of "
                        "28, at most --max-anyres-patches patches), packed into one patch sequence")
    p.add_argument("--max-anyres-patches", type=int, default=None, metavar="N",
                   help="with --anyres: the pixel budget in 14x14 patches (default 16384 = 1792x1792)")
    add_video_args(p)
    p.add_argument("--out", required=True, type=Path, help="output .npz")
    p.set_defaults(func=run)


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary file next to `path`, then rename, so a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        apply_umask(tmp)  # mkstemp creates 0600; give the file the user's ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(args: argparse.Namespace) -> int:
    from sail_jax.data.processor import SailProcessor

    if args.video is not None:
        return run_video(args)
    if args.max_anyres_patches is not None and not args.anyres:
        raise ValueError("--max-anyres-patches needs --anyres")
    if args.anyres:
        return run_anyres(args)
    processor = SailProcessor.from_dir(args.tokenizer, max_num=args.max_tiles, msac=args.msac or None)
    if args.msac and len(args.image) != 1:
        raise ValueError(f"--msac applies to a single image, got {len(args.image)}")
    out = processor(images=args.image, prompt=args.prompt, thinking=args.thinking, system=args.system)
    save_npz_atomic(args.out, out)
    tiles = ", ".join(f"{n} ({c}x{r})" for n, (c, r) in zip(out["num_patches_list"], out["tile_grids"]))
    print(f"wrote {args.out}: {out['input_ids'].shape[1]} tokens, {out['pixel_values'].shape[0]} tiles"
          + (f" [{tiles}]" if tiles else ""))
    return 0


def run_anyres(args: argparse.Namespace) -> int:
    from sail_jax.config import VisionConfig
    from sail_jax.data.processor import SailProcessor

    if args.msac or args.max_tiles is not None:
        raise ValueError("--anyres takes neither --msac nor --max-tiles (images are not tiled)")
    vision = VisionConfig(anyres=True)
    if args.max_anyres_patches is not None:
        if args.max_anyres_patches < 4:
            raise ValueError(f"--max-anyres-patches must be >= 4 (one 28x28 image), got {args.max_anyres_patches}")
        vision = VisionConfig(anyres=True, max_anyres_patches=args.max_anyres_patches)
    processor = SailProcessor.from_dir(args.tokenizer, anyres=vision)
    out = processor(images=args.image, prompt=args.prompt, thinking=args.thinking, system=args.system)
    save_npz_atomic(args.out, out)
    p = vision.patch_size
    grids = ", ".join(f"{h * p}x{w * p}" for h, w in out["anyres_grids"])
    print(f"wrote {args.out}: {out['input_ids'].shape[1]} tokens, {len(out['anyres_patches'])} patches"
          + (f" [{grids}]" if grids else ""))
    return 0


def run_video(args: argparse.Namespace) -> int:
    from sail_jax.data.chat import with_thinking
    from sail_jax.data.processor import SailProcessor

    if args.image or args.msac or args.max_tiles is not None:
        raise ValueError("--video takes neither --image, --msac nor --max-tiles (each frame is one tile)")
    processor = SailProcessor.from_dir(args.tokenizer)
    video = load_video_arg(args)
    text = with_thinking(args.prompt) if args.thinking else args.prompt
    enc = processor.encode_video([{"role": "user", "content": text}], video, system=args.system,
                                 add_generation_prompt=True)
    out = {"input_ids": enc["input_ids"][None], "pixel_values": enc["pixel_values"],
           "num_patches_list": enc["num_patches_list"], "frame_indices": enc["frame_indices"]}
    save_npz_atomic(args.out, out)
    print(f"wrote {args.out}: {out['input_ids'].shape[1]} tokens, {len(out['frame_indices'])} frames "
          f"{out['frame_indices'].tolist()} of {video.num_frames_in_file}")
    return 0
