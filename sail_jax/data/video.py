"""Video frames for SAIL-VL2: frame sampling as VLMEvalKit runs the model, seeking PyAV decoding, one tile per frame.

VLMEvalKit samples N frames (16 by default) at `int(i * step)` with `step = n / (N + 1)`, i = 1..N, n the frame count
of the file; its fps mode takes `int(i * video_fps / F)` for i < int(n / video_fps * F). Each frame becomes ONE
448x448 tile (max tiles 1, hence no thumbnail) normalised like an image, and the prompt lists the frames as
`Frame-k: <image>` lines before the question. VLMEvalKit stores the frames as JPEG files first; that round trip only
adds compression noise and is not reproduced.

Decoding: one demux pass (packets only, nothing decoded; decord builds a like index when it opens a file) lists
every frame's presentation timestamp (pts) and keyframe flag. Frame k is the k-th smallest pts, so a variable frame
rate file maps index -> pts by its real timestamps rather than k / fps, and B-frame reordering is accounted for. Each
target is then reached by seeking to the last keyframe at or before it and decoding forward; a target that lies after
the current decoder position but not past a later keyframe is decoded forward without seeking again. A stream without
packet timestamps (a raw elementary stream) is decoded once from the start instead. Decoding runs on one thread.

Bad files raise `VideoError` (a ValueError) or FileNotFoundError naming the file. A container that promises more
frames than it holds is truncated; a file cut inside its frame data whose container states no frame count (Matroska)
cannot be told from a shorter video and is read as the frames it still holds.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from sail_jax.data.chat import IMAGE_PLACEHOLDER, content_text
from sail_jax.data.images import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, preprocess_image
from sail_jax.files import local_file

DEFAULT_NUM_FRAMES = 16
VIDEO_PLACEHOLDER = "<video>"
MCQ_INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."


class VideoError(ValueError):
    """A video file that cannot be used (not a video, no video stream, no frames, truncated); names the file."""


def uniform_frame_indices(n: int, num_frames: int = DEFAULT_NUM_FRAMES) -> np.ndarray:
    """VLMEvalKit's uniform sampling: `int(i * (n / (N + 1)))` for i = 1..N, in float64 as there.

    The float step is kept on purpose: it can floor one below the exact `i * n // (N + 1)` (n=45, N=32, i=11 gives
    14, not 15). N > n is allowed; indices then repeat."""
    if n < 1:
        raise ValueError(f"a video needs at least one frame to sample from, got n={n}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    step = n / (num_frames + 1)
    return np.array([int(i * step) for i in range(1, num_frames + 1)], np.int64)


def fps_frame_indices(n: int, video_fps: float, fps: float) -> np.ndarray:
    """VLMEvalKit's fps mode: one frame every video_fps / fps frames, `int(i * step)` for i < int(n / video_fps * fps).

    Empty when the clip is shorter than 1 / fps seconds (callers decide what that means)."""
    if n < 1:
        raise ValueError(f"a video needs at least one frame to sample from, got n={n}")
    if not video_fps > 0 or not fps > 0:
        raise ValueError(f"video_fps and fps must be > 0, got video_fps={video_fps}, fps={fps}")
    step = video_fps / fps
    count = int(n / video_fps * fps)
    # i * step < n holds exactly; the clip only guards float rounding at the last frame.
    return np.array([min(int(i * step), n - 1) for i in range(count)], np.int64)


@dataclass(frozen=True)
class VideoIndex:
    """What the demux pass found: `num_frames` (n, the container's count when it gives one), the average frame rate
    (None when the file states none), and per frame in presentation order its pts and keyframe flag (both None for a
    stream without timestamps)."""

    path: Path
    num_frames: int
    fps: float | None
    frame_pts: np.ndarray | None
    keyframes: np.ndarray | None


@dataclass(frozen=True)
class VideoFrames:
    """Decoded frames [N,H,W,3] uint8 RGB, the frame indices they were taken at [N], and the file's frame count."""

    frames: np.ndarray
    indices: np.ndarray
    num_frames_in_file: int


def _open(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise VideoError(f"cannot read video file {path}: {e}") from e


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoError(f"{path} has no video stream")
    return container.streams.video[0]


def _average_fps(stream: av.video.stream.VideoStream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate and rate > 0 else None


def index_video(path: str | os.PathLike) -> VideoIndex:
    """Demux (not decode) the first video stream: frame count, frame rate, pts and keyframes in presentation order.

    n is the container's frame count (`stream.frames`), else the number of video packets found (one frame each, as
    for every codec in use); packets an edit list discards are never shown and do not count. A container that
    promises more frames than its packets hold is truncated."""
    path = Path(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        pts: list[int | None] = []
        keys: list[bool] = []
        discarded = 0
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's flush packet
                continue
            if packet.is_discard:
                discarded += 1
                continue
            pts.append(packet.pts)
            keys.append(packet.is_keyframe)
        declared, fps = stream.frames, _average_fps(stream)
    except av.error.FFmpegError as e:
        raise VideoError(f"cannot read video file {path}: {e}") from e
    finally:
        container.close()
    if not pts:
        raise VideoError(f"{path} has no video frames")
    if declared > len(pts) + discarded:
        raise VideoError(f"{path} is truncated: the container says {declared} frames, only {len(pts)} are present")
    n = min(declared, len(pts)) if declared else len(pts)
    if any(p is None for p in pts):
        return VideoIndex(path, n, fps, None, None)
    order = np.argsort(np.array(pts, np.int64), kind="stable")
    return VideoIndex(path, n, fps, np.array(pts, np.int64)[order][:n], np.array(keys, bool)[order][:n])


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def _decode_sequential(container, stream, index: VideoIndex, wanted: Sequence[int]) -> dict[int, np.ndarray]:
    """Decode from the start, keeping the frames at the wanted positions (streams without timestamps)."""
    targets, out = set(wanted), {}
    last = max(targets)
    for k, frame in enumerate(container.decode(stream)):
        if k in targets:
            out[k] = _rgb(frame)
        if k >= last:
            break
    return out


def _decode_seeking(container, stream, index: VideoIndex, wanted: Sequence[int]) -> dict[int, np.ndarray]:
    """Seek to the keyframe before each target and decode forward to its pts; continue forward instead of seeking
    when the decoder already stands between that keyframe and the target. Packets of frames that no other frame
    refers to are skipped unless wanted (FFmpeg's skip_frame NONREF, decided per packet), which changes no other
    frame and saves about a third of the decoding for H.264 with B-frames."""
    frame_pts, targets, out = index.frame_pts, set(wanted), {}
    target_pts = {int(frame_pts[i]) for i in targets}
    # Seek points: keyframe positions, plus the first frame (a seek there starts the file).
    seek_points = sorted({0, *np.flatnonzero(index.keyframes).tolist()})
    codec = stream.codec_context
    packets, position = None, -1  # packet iterator and the presentation position of the last decoded frame

    def seek(k: int):
        container.seek(int(frame_pts[seek_points[k]]), stream=stream, backward=True, any_frame=False)
        return container.demux(stream)

    def decode_to(target: int) -> bool:
        """Decode until a frame at or past the target comes out (True) or the stream ends (False)."""
        nonlocal position
        for packet in packets:
            codec.skip_frame = "DEFAULT" if packet.pts in target_pts else "NONREF"
            reached = False
            for frame in codec.decode(packet):
                if frame.pts is None:
                    continue
                position = int(np.searchsorted(frame_pts, frame.pts))
                if position in targets and frame_pts[position] == frame.pts:
                    out.setdefault(position, _rgb(frame))
                reached = reached or frame.pts >= frame_pts[target]
            if reached:
                return True
        return False

    for target in sorted(targets):
        if target in out:
            continue
        k = bisect.bisect_right(seek_points, target) - 1
        if packets is None or not seek_points[k] <= position < target:
            packets = seek(k)
        if not decode_to(target):
            return out  # the stream ended first; the caller reports the missing frames
        if target not in out and k > 0:
            # Passed the target without seeing it: the demuxer's seek may have landed past our keyframe, so try once
            # more from the keyframe before; a frame still missing then is corrupt (the caller reports it).
            packets = seek(k - 1)
            decode_to(target)
    return out


def read_frames(index: VideoIndex, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at `indices` (positions in presentation order, repeats allowed): [N,H,W,3] uint8 RGB."""
    wanted = [int(i) for i in indices]
    if not wanted:
        raise ValueError(f"no frame indices to read from {index.path}")
    bad = [i for i in wanted if not 0 <= i < index.num_frames]
    if bad:
        raise ValueError(f"frame indices {bad} are outside 0..{index.num_frames - 1} of {index.path}")
    container = _open(index.path)
    try:
        stream = _video_stream(container, index.path)
        # Single-threaded: every seek flushes the decoder, which drains frame threads' pipeline each time (slower than
        # one thread here), and a data loader decodes several samples in parallel anyway.
        stream.thread_type = "NONE"
        decode = _decode_sequential if index.frame_pts is None else _decode_seeking
        got = decode(container, stream, index, wanted)
    except av.error.FFmpegError as e:
        raise VideoError(f"cannot decode video file {index.path}: {e}") from e
    finally:
        container.close()
    missing = sorted(set(wanted) - set(got))
    if missing:
        raise VideoError(f"{index.path} is truncated or corrupt: frame(s) {missing[:5]} of {index.num_frames} "
                         f"cannot be decoded")
    first = got[wanted[0]]
    if any(got[i].shape != first.shape for i in wanted):
        raise VideoError(f"{index.path} changes its frame size mid-stream")
    return np.stack([got[i] for i in wanted])


def load_video(
    path: str | os.PathLike, num_frames: int = DEFAULT_NUM_FRAMES, fps: float | None = None
) -> VideoFrames:
    """Sample and decode a video's frames: `num_frames` uniformly, or with `fps` one frame every video_fps / fps
    frames (VLMEvalKit's two modes). PyAV reads local files: a video on a URL is read from its local copy
    (`files.local_file`, fetched once per host)."""
    index = index_video(local_file(path, "video file"))
    if fps is None:
        indices = uniform_frame_indices(index.num_frames, num_frames)
    else:
        if index.fps is None:
            raise VideoError(f"{index.path} states no frame rate, so frames cannot be taken at {fps} frame(s)/s")
        indices = fps_frame_indices(index.num_frames, index.fps, fps)
        if len(indices) == 0:
            raise VideoError(f"{index.path} lasts {index.num_frames / index.fps:.3g} s, too short for {fps} frame(s)/s")
    return VideoFrames(read_frames(index, indices), indices, index.num_frames)


def video_pixel_values(
    frames: np.ndarray,
    image_size: int = IMAGE_SIZE,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> np.ndarray:
    """[N,H,W,3] uint8 RGB frames -> [N,3,S,S] float32: each frame ONE tile through the image path with max tiles 1
    (grid (1, 1), so no thumbnail), as VLMEvalKit tiles video frames."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [N,H,W,3], got {frames.dtype} {frames.shape}")
    tiles = [preprocess_image(Image.fromarray(f), 1, 1, False, image_size, mean, std).pixel_values for f in frames]
    return np.concatenate(tiles) if tiles else np.zeros((0, 3, image_size, image_size), np.float32)


def preprocess_video(
    path: str | os.PathLike,
    num_frames: int = DEFAULT_NUM_FRAMES,
    fps: float | None = None,
    image_size: int = IMAGE_SIZE,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> dict[str, np.ndarray]:
    """A video as model inputs, in the processor's image-array layout: pixel_values [N,3,S,S] float32,
    num_patches_list [N] (all 1: one tile per frame) and frame_indices [N]."""
    video = load_video(path, num_frames, fps)
    return {
        "pixel_values": video_pixel_values(video.frames, image_size, mean, std),
        "num_patches_list": np.ones(len(video.indices), np.int64),
        "frame_indices": video.indices,
    }


def frame_lines(num_frames: int) -> str:
    """`Frame-1: <image>\\n...Frame-N: <image>\\n`: VLMEvalKit's listing of a video's frames before the question.

    Each `<image>` is one frame of one tile: the processor's `<image>` expansion with num_patches_list all 1 turns it
    into `<img>` + 256 `<IMG_CONTEXT>` + `</img>`."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return "".join(f"Frame-{k}: {IMAGE_PLACEHOLDER}\n" for k in range(1, num_frames + 1))


def video_prompt(question: str, num_frames: int, mcq: bool = False) -> str:
    """The frame lines + question (+ the letter instruction for Video-MME-style MCQ)."""
    return frame_lines(num_frames) + question + (MCQ_INSTRUCTION if mcq else "")


def place_video(messages: Sequence[Mapping[str, Any]], num_frames: int) -> list[dict[str, Any]]:
    """Messages with the frame lines at the one `<video>` marker (a following newline is absorbed, so
    `<video>\\nQ` reads as VLMEvalKit's prompt), or before the first user message's text when there is no marker.

    `<image>` markers are refused: a video prompt's `<image>` markers are its frames."""
    msgs = [{**m, "content": content_text(m.get("content", ""))} for m in messages]
    texts = [m["content"] for m in msgs]
    if any(IMAGE_PLACEHOLDER in t for t in texts):
        raise ValueError(f"a prompt with a video cannot also hold {IMAGE_PLACEHOLDER} markers")
    markers = sum(t.count(VIDEO_PLACEHOLDER) for t in texts)
    if markers > 1:
        raise ValueError(f"the prompt has {markers} {VIDEO_PLACEHOLDER} markers; one video is allowed")
    lines = frame_lines(num_frames)
    if markers == 0:
        first_user = next((m for m in msgs if m.get("role") == "user"), None)
        if first_user is None:
            raise ValueError("a video was given but the conversation has no user message")
        first_user["content"] = lines + first_user["content"]
        return msgs
    for m in msgs:
        text = m["content"]
        if VIDEO_PLACEHOLDER in text:
            marker = VIDEO_PLACEHOLDER + "\n" if VIDEO_PLACEHOLDER + "\n" in text else VIDEO_PLACEHOLDER
            m["content"] = text.replace(marker, lines, 1)
    return msgs


def resize_frames(frames: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """[N,H,W,3] uint8 -> [N,S,S,3] uint8, resized as the image path resizes a one-tile image (PIL's default
    filter), so that tiling the result again gives the same tiles (PIL returns a same-size resize unchanged)."""
    size = (image_size, image_size)
    return np.stack([np.asarray(Image.fromarray(f).resize(size)) for f in frames])
