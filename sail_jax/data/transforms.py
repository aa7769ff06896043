"""Per-sample transform: raw record -> tokenized, tiled, loss-masked sample (or a located skip marker).

Output of a good sample (what the packer consumes):
  input_ids [N] int32, loss_mask [N] int32 (1 = the token is a prediction target), pixel_values [n_tiles,3,S,S]
  float32 (the sample's tiles in image order), info {dataset, where, tokens, tiles, truncated, cot}.
A bad one becomes {"skip": reason, "dataset", "where", "error"}; the main process counts, logs and filters it
(`packing.SkipBadSamplesIterDataset`), so counts stay exact with worker processes.

Loss masks (`loss_on`, our choice of what a response is). An assistant response is CoT when it holds a
`<think>…</think>` block with non-blank content; a direct one has none or an empty `<think></think>` scaffold. A
sample is CoT when any of its responses is (`info["cot"]`, for statistics).
  * "thought_and_answer" (default; LongCoT SFT): every assistant-response token, incl. `<think>…</think>` and the
    closing `<|im_end|>`; never system, user or image tokens, nor the `<|im_start|>assistant\\n` header (the
    processor's mask).
  * "conditional" (Think-Fusion SFT): CoT responses keep the whole mask (thought + answer); a direct response keeps
    only the answer: its empty scaffold and the whitespace after it are masked out.
  * "answer": every response keeps only its answer: the whole think block (empty or not) and the whitespace after
    it are masked out.
The trainer divides the summed loss by the target count of the whole global batch, so in a mixed batch both kinds
share one denominator (the Think-Fusion objective).

Video records (`"video": path`) are sampled as VLMEvalKit samples for the model (`num_frames` uniformly, or `fps`),
each frame ONE tile listed as `Frame-k: <image>` at the `<video>` marker (LLaVA-Video's own files mark the video
with a lone `<image>`, read as the marker; none: before the first question); the frames count as the sample's
tiles. Frames come through `frame_cache.load_tile_frames`, cached on disk when `frame_cache_dir` is set.

Images share the row's tile budget: with n images each is tiled with max_num = min(max_num, max_tiles // n - 1)
(so tiles + thumbnail fit), or 1 tile each when that budget is below 3. Over-long samples (more than `seq_len`
tokens or `max_tiles` tiles) are dropped, or with `over_long="truncate"` cut to the longest prefix that fits,
cutting only before an image (its tiles go with it); a truncation that leaves no target token is a drop.

SAIL-ViT-AnyRes (`anyres`, the model's vision config): images are not tiled; a sample carries its images' patches
anyres_patches [P, p*p*3] and patch grids anyres_grids [n, 2] (the processor's AnyRes output) in place of
pixel_values, and the row budget is `max_patches` patches instead of `max_tiles` tiles (same drop / truncate rule;
info["tiles"] then counts patches).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from PIL import Image

from sail_jax.config import IMG_END_TOKEN_ID, IMG_START_TOKEN_ID, VisionConfig
from sail_jax.data import chat
from sail_jax.data.frame_cache import load_tile_frames
from sail_jax.data.images import load_image
from sail_jax.data.processor import SailProcessor
from sail_jax.data.sources import BadSample, Conversation, RawRecord, parse_record
from sail_jax.data.video import DEFAULT_NUM_FRAMES, VIDEO_PLACEHOLDER

OVER_LONG_POLICIES = ("drop", "truncate")
LOSS_ON = ("thought_and_answer", "conditional", "answer")
SKIP_REASONS = ("malformed", "missing_image", "bad_image", "image_mismatch", "too_long", "missing_video", "bad_video")


@functools.lru_cache(maxsize=4)
def _processor(tokenizer_dir: str, max_num: int, image_size: int | None,
               anyres: VisionConfig | None = None) -> SailProcessor:
    """One processor per process and setting (the tokenizer takes seconds to build; workers build their own)."""
    return SailProcessor.from_dir(tokenizer_dir, max_num=max_num, image_size=image_size, msac=False, anyres=anyres)


def per_image_max_num(max_num: int, n_images: int, max_tiles: int) -> int:
    """Tiles per image (before the thumbnail) so that n images fit the row's tile budget where possible."""
    budget = max_tiles // max(n_images, 1)
    return min(max_num, budget - 1) if budget >= 3 else 1


def response_loss_mask(
    input_ids: np.ndarray, loss_mask: np.ndarray, think_ids: tuple[int, int], is_blank: Callable[[np.ndarray], bool],
    loss_on: str,
) -> tuple[np.ndarray, bool]:
    """The `loss_on` mask (module docstring) from the default mask: returns (mask, whether any response is CoT).

    Responses are the maximal runs of the default mask; `is_blank(ids)` says whether ids decode to whitespace."""
    mask = loss_mask.copy()
    start_id, end_id = think_ids
    edges = np.flatnonzero(np.diff(np.concatenate([[0], loss_mask.astype(np.int8), [0]])))
    cot = False
    for lo, hi in zip(edges[::2], edges[1::2]):
        run = input_ids[lo:hi]
        opens, closes = np.flatnonzero(run == start_id), np.flatnonzero(run == end_id)
        if not len(opens) or not len(closes) or closes[0] < opens[0]:
            continue
        a, b = int(opens[0]), int(closes[0])
        thought = not is_blank(run[a + 1 : b])
        cot |= thought
        if loss_on == "thought_and_answer" or (loss_on == "conditional" and thought):
            continue
        b += 1
        while b < len(run) - 1 and is_blank(run[b : b + 1]):  # never the closing <|im_end|>
            b += 1
        mask[lo + a : lo + b] = 0
    return mask, cot


def truncation_point(input_ids: np.ndarray, num_tiles: Sequence[int], seq_len: int, max_tiles: int) -> tuple[int, int]:
    """(tokens, images) of the longest prefix with <= seq_len tokens and <= max_tiles tiles, cut before an image."""
    starts = np.flatnonzero(input_ids == IMG_START_TOKEN_ID)
    ends = np.flatnonzero(input_ids == IMG_END_TOKEN_ID)
    tiles = 0
    for k, n in enumerate(num_tiles):
        tiles += n
        if ends[k] >= seq_len or tiles > max_tiles:
            return int(starts[k]), k
    return min(len(input_ids), seq_len), len(num_tiles)


@dataclasses.dataclass(frozen=True)
class SampleTransform(grain.transforms.Map):
    """Raw record -> sample dict or skip marker. Picklable: the processor is rebuilt lazily in each process."""

    tokenizer_dir: str
    image_root: str
    dataset: int
    seq_len: int
    max_tiles: int
    max_num: int = 12
    image_size: int | None = None
    over_long: str = "drop"
    loss_on: str = "thought_and_answer"
    system_prompt: str | None = None
    allow_absolute_image_paths: bool = False
    num_frames: int = DEFAULT_NUM_FRAMES
    fps: float | None = None
    frame_cache_dir: str | None = None
    anyres: VisionConfig | None = None
    max_patches: int = 16384

    def __post_init__(self):
        if self.max_patches < 4:
            raise ValueError(f"max_patches must be >= 4 (one 28x28 image), got {self.max_patches}")
        if self.over_long not in OVER_LONG_POLICIES:
            raise ValueError(f"over_long={self.over_long!r}; expected one of {OVER_LONG_POLICIES}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={self.loss_on!r}; expected one of {LOSS_ON}")
        if self.seq_len < 1 or self.max_tiles < 1 or self.max_num < 1:
            raise ValueError(f"seq_len, max_tiles and max_num must be >= 1, got {self.seq_len}, {self.max_tiles}, "
                             f"{self.max_num}")
        if self.num_frames < 1 or (self.fps is not None and not self.fps > 0):
            raise ValueError(f"num_frames must be >= 1 and fps > 0, got num_frames={self.num_frames}, fps={self.fps}")

    @property
    def processor(self) -> SailProcessor:
        return _processor(self.tokenizer_dir, self.max_num, self.image_size, self.anyres)

    def map(self, record: RawRecord) -> dict[str, Any]:
        try:
            return self.encode(record)
        except BadSample as e:
            return {"skip": e.reason, "dataset": self.dataset, "where": record.where, "error": str(e)}

    def encode(self, record: RawRecord) -> dict[str, Any]:
        conv = parse_record(record.data, self.image_root, self.allow_absolute_image_paths)
        enc = self._encode_images(conv) if conv.video is None else self._encode_video(conv)
        ids, mask = enc["input_ids"], enc["loss_mask"].astype(np.int32)
        tok = self.processor.tokenizer
        think_ids = (tok.token_to_id("<think>"), tok.token_to_id("</think>"))
        is_blank = lambda t: not tok.decode(t.tolist(), skip_special_tokens=False).strip()
        mask, cot = response_loss_mask(ids, mask, think_ids, is_blank, self.loss_on)
        if self.anyres is not None:  # the budget counts patches; an image's patches and grid go together
            vision = {"anyres_patches": enc["anyres_patches"], "anyres_grids": enc["anyres_grids"]}
            per_image, unit, budget = [int(h * w) for h, w in enc["anyres_grids"]], "patches", self.max_patches
        else:
            vision = {"pixel_values": enc["pixel_values"]}
            per_image, unit, budget = enc["num_patches_list"].tolist(), "tiles", self.max_tiles
        truncated = len(ids) > self.seq_len or sum(per_image) > budget
        if truncated:
            what = f"{len(ids)} tokens, {sum(per_image)} {unit} (limits {self.seq_len}, {budget})"
            if self.over_long == "drop":
                raise BadSample("too_long", what)
            n_tok, n_img = truncation_point(ids, per_image, self.seq_len, budget)
            ids, mask = ids[:n_tok], mask[:n_tok]
            cut = {"anyres_grids": n_img}  # per image; the other arrays are cut after the images' units
            vision = {k: v[: cut.get(k, sum(per_image[:n_img]))] for k, v in vision.items()}
            if not mask.any():
                raise BadSample("too_long", f"{what}; no target token left after truncation")
        n_vision = len(vision.get("pixel_values", vision.get("anyres_patches", ())))
        info = {"dataset": self.dataset, "where": record.where, "tokens": len(ids), "tiles": n_vision,
                "truncated": truncated, "cot": cot}
        return {"input_ids": ids, "loss_mask": mask, **vision, "info": info}

    def _encode_images(self, conv: Conversation) -> dict[str, np.ndarray]:
        texts = [m["content"] for m in conv.messages]
        markers = sum(t.count(chat.IMAGE_PLACEHOLDER) for t in texts)
        # With no marker at all the processor puts `<image>\n` per image before the first user turn (model.chat).
        if (markers or not conv.images) and markers != len(conv.images):
            raise BadSample("image_mismatch", f"{markers} {chat.IMAGE_PLACEHOLDER} marker(s) for "
                                              f"{len(conv.images)} image(s)")
        images = [self._load(p) for p in conv.images]
        proc = self.processor
        max_num = per_image_max_num(self.max_num, len(images), self.max_tiles)
        if max_num != proc.max_num and self.anyres is None:
            proc = dataclasses.replace(proc, max_num=max_num)
        try:
            return proc.encode_conversation(conv.messages, images, system=self.system_prompt)
        except ValueError as e:  # roles and markers are checked above: what is left is tiling a bad image
            raise BadSample("bad_image", str(e)) from e

    def _encode_video(self, conv: Conversation) -> dict[str, np.ndarray]:
        messages = conv.messages
        texts = [m["content"] for m in messages]
        images, videos = (sum(t.count(m) for t in texts) for m in (chat.IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER))
        if images == 1 and videos == 0:  # LLaVA-Video's spelling of the video marker
            messages = [{**m, "content": m["content"].replace(chat.IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)}
                        for m in messages]
        elif images or videos > 1:
            raise BadSample("image_mismatch", f"{videos} {VIDEO_PLACEHOLDER} and {images} {chat.IMAGE_PLACEHOLDER} "
                                              f"marker(s) for one video")
        proc = self.processor
        try:
            video = load_tile_frames(conv.video, self.num_frames, self.fps, proc.image_size, self.frame_cache_dir)
        except FileNotFoundError as e:
            raise BadSample("missing_video", str(e)) from e
        except ValueError as e:  # VideoError and unusable sampling (a clip too short for fps)
            raise BadSample("bad_video", str(e)) from e
        return proc.encode_video(messages, video, system=self.system_prompt)

    @staticmethod
    def _load(path: Path) -> Image.Image:
        try:
            return load_image(path)
        except FileNotFoundError as e:
            raise BadSample("missing_image", str(e)) from e
        except ValueError as e:
            raise BadSample("bad_image", str(e)) from e
