"""`SailProcessor`: images + chat text -> model inputs, exactly as the original SAILVLProcessor.

Settings come from `preprocessor_config.json` (max_dynamic_patch 10 in the release), which is what the original
processor reads; config.json's max_dynamic_patch (12) is not used. Pixel values stay float32; the original casts them
to bfloat16, which callers do on the device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sail_jax.config import IMG_CONTEXT_TOKEN_ID, IMG_END_TOKEN_ID, IMG_START_TOKEN_ID, VisionConfig
from sail_jax.data import chat
from sail_jax.data.images import (
    IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PATCH_SIZE,
    anyres_preprocess,
    load_image,
    preprocess_image,
)
from sail_jax.data.tokenizer import SailTokenizer, find_tokenizer_dir
from sail_jax.data.video import VideoFrames, place_video
from sail_jax.models.anyres import llm_tokens, patchify

ImageInput = str | os.PathLike | Image.Image
_IMAGE_TOKEN_IDS = np.array([IMG_START_TOKEN_ID, IMG_CONTEXT_TOKEN_ID, IMG_END_TOKEN_ID])


def _image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """A lone path or image means one image (a string must not be iterated character by character)."""
    return [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)


@dataclass(frozen=True)
class SailProcessor:
    """Tiling settings plus the tokenizer. `max_num` is the processor's max_dynamic_patch; `msac` applies to
    single-image inputs only, as upstream. With `anyres` (the vision config of a SAIL-ViT-AnyRes model) images are
    not tiled: each keeps its native resolution (`models.anyres.anyres_size`) and becomes (h/28)*(w/28) LLM
    tokens; the tiling settings are then unused."""

    tokenizer: SailTokenizer
    max_num: int = 10
    min_num: int = 1
    msac: bool = False
    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    anyres: VisionConfig | None = None

    def __post_init__(self):
        if not 1 <= self.min_num <= self.max_num:
            raise ValueError(f"max tiles must be >= min tiles >= 1, got max_num={self.max_num}, min_num={self.min_num}")
        if self.image_size % (2 * self.patch_size):
            raise ValueError(f"image_size {self.image_size} must be a multiple of 2*patch_size ({2 * self.patch_size})")

    @classmethod
    def from_dir(cls, tokenizer_dir: str | Path, **overrides: Any) -> SailProcessor:
        """Tokenizer and settings from a model/tokenizer directory; keyword overrides (None = keep) win."""
        directory = find_tokenizer_dir(tokenizer_dir)
        proc = cls(SailTokenizer.from_dir(directory))
        config_path = directory / "preprocessor_config.json"
        if config_path.is_file():
            try:
                cfg = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read {config_path}: {e}") from e
            fields = {"max_dynamic_patch": "max_num", "use_msac": "msac", "image_size": "image_size",
                      "patch_size": "patch_size", "image_mean": "mean", "image_std": "std"}
            values = {ours: cfg[theirs] for theirs, ours in fields.items() if theirs in cfg}
            for key in ("mean", "std"):
                if key in values:
                    values[key] = tuple(float(v) for v in values[key])
            proc = replace(proc, **values)
        unknown = set(overrides) - {f for f in cls.__dataclass_fields__ if f != "tokenizer"}
        if unknown:
            raise TypeError(f"unknown processor setting(s): {', '.join(sorted(unknown))}")
        return replace(proc, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens per tile after the 2x2 pixel shuffle: (448/14)^2 / 4 = 256."""
        return (self.image_size // self.patch_size) ** 2 // 4

    def preprocess_images(self, images: ImageInput | Sequence[ImageInput]) -> dict[str, np.ndarray]:
        """Tile every image independently: pixel_values [T,3,S,S] float32, num_patches_list [n], tile_grids [n,2]
        (cols, rows; MSAC: the first grid), image_sizes [n,2] (w, h). AnyRes: `preprocess_anyres`."""
        images = _image_list(images)
        if self.anyres is not None:
            return self.preprocess_anyres(images)
        msac = self.msac and len(images) == 1
        tiled = [
            preprocess_image(load_image(im), self.max_num, self.min_num, msac, self.image_size, self.mean, self.std)
            for im in images
        ]
        size = self.image_size
        return {
            "pixel_values": (np.concatenate([t.pixel_values for t in tiled]) if tiled
                             else np.zeros((0, 3, size, size), np.float32)),
            "num_patches_list": np.array([t.num_tiles for t in tiled], np.int64),
            "tile_grids": np.array([t.grid for t in tiled], np.int64).reshape(-1, 2),
            "image_sizes": np.array([t.size for t in tiled], np.int64).reshape(-1, 2),
        }

    def preprocess_anyres(self, images: Sequence[ImageInput]) -> dict[str, np.ndarray]:
        """Native-resolution images, patchified and concatenated in order: anyres_patches [P, p*p*3] float32 (ready
        for `models.anyres.pack_patches`), anyres_grids [n,2] (h/p, w/p patch grid of each image), image_sizes
        [n,2] (w, h of the original)."""
        cfg = self.anyres
        patches, grids, sizes = [], [], []
        for im in images:
            image = load_image(im)
            pixels, grid = anyres_preprocess(image, cfg, self.mean, self.std)
            patches.append(patchify(pixels, cfg.patch_size))
            grids.append(grid)
            sizes.append(image.size)
        dim = cfg.patch_size**2 * cfg.num_channels
        return {
            "anyres_patches": np.concatenate(patches) if patches else np.zeros((0, dim), np.float32),
            "anyres_grids": np.array(grids, np.int64).reshape(-1, 2),
            "image_sizes": np.array(sizes, np.int64).reshape(-1, 2),
        }

    def image_token_counts(self, encoded: Mapping[str, np.ndarray]) -> list[int]:
        """`<IMG_CONTEXT>` tokens of each image of `preprocess_images`' output: tiles x 256, or AnyRes
        (h/28)*(w/28)."""
        if self.anyres is not None:
            return llm_tokens(encoded["anyres_grids"])
        return [int(n) * self.tokens_per_tile for n in encoded["num_patches_list"]]

    def encode_conversation(
        self,
        messages: Sequence[Mapping[str, Any]],
        images: ImageInput | Sequence[ImageInput] = (),
        system: str | None = None,
        add_generation_prompt: bool = False,
    ) -> dict[str, np.ndarray]:
        """A conversation (roles system/user/assistant) plus its images -> input_ids [N] int32, loss_mask [N] bool
        and the image arrays of `preprocess_images`.

        Images fill the `<image>` markers in order; with no marker anywhere, `<image>\\n` per image is prepended to
        the first user message (model.chat style). loss_mask is True on assistant-response tokens incl. their
        `<|im_end|>`; a token straddling the header/response border counts as header, image tokens never count."""
        images = _image_list(images)
        msgs = [dict(m) for m in messages]
        if images and not any(chat.IMAGE_PLACEHOLDER in chat.content_text(m.get("content", "")) for m in msgs):
            first_user = next((m for m in msgs if m.get("role") == "user"), None)
            if first_user is None:
                raise ValueError(f"{len(images)} image(s) given but the conversation has no user message")
            first_user["content"] = chat.add_image_placeholders(chat.content_text(first_user["content"]), len(images))
        segments = chat.render_segments(msgs, system, add_generation_prompt)
        chat.check_placeholders([s.text for s in segments], len(images))  # before the costly tiling
        out = self.preprocess_images(images)
        texts = chat.expand_images([s.text for s in segments], self.image_token_counts(out), 1)
        ids, offsets = self.tokenizer.encode_with_offsets("".join(texts))
        spans, start = [], 0
        for text, segment in zip(texts, segments):
            if segment.trainable:
                spans.append((start, start + len(text)))
            start += len(text)
        starts = np.array([o[0] for o in offsets], np.int64)
        loss_mask = np.zeros(len(ids), bool)
        for lo, hi in spans:
            loss_mask |= (starts >= lo) & (starts < hi)
        input_ids = np.array(ids, np.int32)
        loss_mask &= ~np.isin(input_ids, _IMAGE_TOKEN_IDS)
        return {"input_ids": input_ids, "loss_mask": loss_mask, **out}

    def encode_video(
        self,
        messages: Sequence[Mapping[str, Any]],
        video: VideoFrames,
        system: str | None = None,
        add_generation_prompt: bool = False,
    ) -> dict[str, np.ndarray]:
        """A conversation about one video -> `encode_conversation`'s arrays plus frame_indices [N].

        As VLMEvalKit runs SAIL-VL2 on video: the frames are listed as `Frame-k: <image>` lines at the `<video>`
        marker (or before the first user text, `video.place_video`) and each frame is ONE tile (max tiles 1, so no
        thumbnail, no MSAC), expanded like an image's `<image>`."""
        msgs = place_video(messages, len(video.indices))
        frames = [Image.fromarray(f) for f in video.frames]
        one_tile = replace(self, max_num=1, min_num=1, msac=False)
        enc = one_tile.encode_conversation(msgs, frames, system, add_generation_prompt)
        return {**enc, "frame_indices": np.asarray(video.indices, np.int64)}

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] = (),
        prompt: str = "",
        thinking: bool = False,
        system: str | None = None,
    ) -> dict[str, np.ndarray]:
        """One user turn (the images in order, then the text) with an open assistant turn, as the original processor
        after `apply_chat_template`: input_ids [1,N] int32 plus the image arrays. `thinking` appends the CoT
        instruction after a newline."""
        text = chat.with_thinking(prompt) if thinking else prompt
        enc = self.encode_conversation([{"role": "user", "content": text}], images, system, add_generation_prompt=True)
        del enc["loss_mask"]
        enc["input_ids"] = enc["input_ids"][None]
        return enc
