"""`sail-jax preprocess`: images + prompt -> inputs.npz (input_ids, pixel_values, tile bookkeeping), host side only."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from sail_jax.files import apply_umask


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess",
        help="tile images and tokenize a one-turn prompt as the original SAIL-VL2 processor, write an .npz",
    )
    p.add_argument("--tokenizer", required=True, type=Path,
                   help="directory with vocab.json + merges.txt (or tokenizer.json) and preprocessor_config.json")
    p.add_argument("--image", action="append", default=[], type=Path,
                   help="image file; repeat for several images, in order")
    p.add_argument("--prompt", required=True, help="user text; <image> markers place the images, else they go first")
    p.add_argument("--system", default=None, help="system prompt (default: the SAIL-VL2 Chinese one; '' for none)")
    p.add_argument("--max-tiles", type=int, default=None,
                   help="max tiles per image before the thumbnail (default: preprocessor_config.json, 10)")
    p.add_argument("--thinking", action="store_true", help="append the CoT (thinking-mode) instruction to the prompt")
    p.add_argument("--msac", action="store_true", help="multi-scale tiling (single image only)")
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

    processor = SailProcessor.from_dir(args.tokenizer, max_num=args.max_tiles, msac=args.msac or None)
    if args.msac and len(args.image) != 1:
        raise ValueError(f"--msac applies to a single image, got {len(args.image)}")
    out = processor(images=args.image, prompt=args.prompt, thinking=args.thinking, system=args.system)
    save_npz_atomic(args.out, out)
    tiles = ", ".join(f"{n} ({c}x{r})" for n, (c, r) in zip(out["num_patches_list"], out["tile_grids"]))
    print(f"wrote {args.out}: {out['input_ids'].shape[1]} tokens, {out['pixel_values'].shape[0]} tiles"
          + (f" [{tiles}]" if tiles else ""))
    return 0
