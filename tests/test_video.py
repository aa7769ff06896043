"""Video frames: VLMEvalKit's index formulas, seeking PyAV decoding (CFR, VFR, no timestamps), tiles, prompt, bad files.

Test videos are written with PyAV (tests/video_utils.py): every frame shows its own index, read back from the decoded
pixels, so a test sees which frame it really got despite compression.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from sail_jax.data import chat
from sail_jax.data.images import IMAGENET_MEAN, IMAGENET_STD
from sail_jax.data.video import (
    MCQ_INSTRUCTION,
    VideoError,
    fps_frame_indices,
    index_video,
    load_video,
    preprocess_video,
    read_frames,
    uniform_frame_indices,
    video_pixel_values,
    video_prompt,
)
from tests.video_utils import H, W, read_index, write_audio, write_video


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {
        "mp4": write_video(d / "clip.mp4", 50),
        "mkv": write_video(d / "clip.mkv", 50),  # Matroska states no frame count: n comes from the packets
        "h264": write_video(d / "clip.h264", 20, fmt="h264"),  # raw stream: no timestamps, decoded from the start
    }


def test_uniform_indices_follow_vlmevalkit():
    assert uniform_frame_indices(100, 4).tolist() == [20, 40, 60, 80]
    assert uniform_frame_indices(1000).tolist() == [58, 117, 176, 235, 294, 352, 411, 470, 529, 588, 647, 705, 764,
                                                    823, 882, 941]
    # VLMEvalKit's float step floors one below the exact quotient here; we keep its result.
    assert uniform_frame_indices(45, 32)[10] == 14 and 11 * 45 // 33 == 15
    assert uniform_frame_indices(3, 8).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]  # N > n: indices repeat
    assert uniform_frame_indices(1, 16).tolist() == [0] * 16
    for n in (1, 2, 5, 16, 17, 33, 90, 301, 3600, 10007):
        for num in (1, 2, 8, 16, 32, 64):
            idx = uniform_frame_indices(n, num)
            step = n / (num + 1)
            assert idx.tolist() == [int(i * step) for i in range(1, num + 1)]
            assert len(idx) == num and idx.min() >= 0 and idx.max() < n and np.all(np.diff(idx) >= 0)
            exact = np.arange(1, num + 1) * n // (num + 1)
            assert np.all((exact - idx >= 0) & (exact - idx <= 1))
    with pytest.raises(ValueError, match="at least one frame"):
        uniform_frame_indices(0)
    with pytest.raises(ValueError, match="num_frames"):
        uniform_frame_indices(10, 0)


def test_fps_indices_follow_vlmevalkit():
    assert fps_frame_indices(300, 30.0, 1.0).tolist() == list(range(0, 300, 30))
    assert fps_frame_indices(90, 30.0, 2.0).tolist() == list(range(0, 90, 15))
    assert fps_frame_indices(100, 29.97, 1.0).tolist() == [0, 29, 59]
    assert fps_frame_indices(10, 30.0, 1.0).tolist() == []  # a third of a second at 1 frame/s
    for n in (1, 7, 59, 60, 61, 1799, 3600):
        for video_fps in (23.976, 25.0, 30000 / 1001, 60.0):
            for fps in (0.5, 1.0, 2.0, 8.0):
                idx = fps_frame_indices(n, video_fps, fps)
                assert len(idx) == int(n / video_fps * fps)
                assert idx.tolist() == [int(i * (video_fps / fps)) for i in range(len(idx))]
                assert np.all(idx < n) and np.all(np.diff(idx) > 0)
    with pytest.raises(ValueError, match="must be > 0"):
        fps_frame_indices(10, 30.0, 0.0)


@pytest.mark.parametrize("kind,n", [("mp4", 50), ("mkv", 50), ("h264", 20)])
@pytest.mark.parametrize("num_frames", [4, 16, 64])
def test_load_video_decodes_the_sampled_frames(videos, kind, n, num_frames):
    out = load_video(videos[kind], num_frames)
    assert out.num_frames_in_file == n
    assert out.indices.tolist() == uniform_frame_indices(n, num_frames).tolist()
    assert out.frames.shape == (num_frames, H, W, 3) and out.frames.dtype == np.uint8
    assert [read_index(f) for f in out.frames] == out.indices.tolist()


def test_read_frames_any_order_with_repeats(videos):
    index = index_video(videos["mp4"])
    assert index.frame_pts is not None and np.all(np.diff(index.frame_pts) > 0)
    assert index.keyframes[0] and 1 < index.keyframes.sum() < 50  # GOP 8: several keyframes to seek between
    wanted = [49, 0, 7, 7, 8, 25, 24, 26, 1]
    frames = read_frames(index, wanted)
    assert [read_index(f) for f in frames] == wanted
    # Pixel-exact against decoding every frame in order (seeking and skipping unreferenced frames change nothing).
    with av.open(str(videos["mp4"])) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    np.testing.assert_array_equal(frames, np.stack([every[k] for k in wanted]))
    with pytest.raises(ValueError, match="outside 0..49"):
        read_frames(index, [50])


def test_fps_mode(videos):
    out = load_video(videos["mp4"], fps=2.0)  # 50 frames at 30 fps: 1.67 s -> 3 frames, 15 apart
    assert out.indices.tolist() == [0, 15, 30]
    assert [read_index(f) for f in out.frames] == [0, 15, 30]
    with pytest.raises(VideoError, match="too short"):
        load_video(videos["mp4"], fps=0.5)


def test_variable_frame_rate(tmp_path):
    gaps = [10, 40, 10, 150, 10, 10, 280, 10, 390, 20, 20, 300, 5, 5, 100]
    pts_ms = np.concatenate([[0], np.cumsum(gaps)]).tolist()
    path = write_video(tmp_path / "vfr.mp4", len(pts_ms), pts_ms=pts_ms)
    index = index_video(path)
    assert index.num_frames == len(pts_ms)
    with av.open(str(path)) as container:
        time_base = float(container.streams.video[0].time_base)
    np.testing.assert_allclose(index.frame_pts * time_base, np.array(pts_ms) / 1000, atol=1e-3)
    # Seeking to time k / average fps would fetch other frames here; the real timestamps must be used.
    seconds = np.array(pts_ms) / 1000
    naive = [int(np.abs(seconds - k / index.fps).argmin()) for k in range(len(pts_ms))]
    assert naive != list(range(len(pts_ms)))
    for num_frames in (5, 15, 40):
        out = load_video(path, num_frames)
        assert [read_index(f) for f in out.frames] == uniform_frame_indices(len(pts_ms), num_frames).tolist()


def test_pixel_values_one_tile_perframe_image(videos):
    frames = load_video(videos["mp4"], 3).frames
    pv = video_pixel_values(frames)
    assert pv.shape == (3, 3, 448, 448) and pv.dtype == np.float32
    for frame, tile in zip(frames, pv):
        resized = np.asarray(Image.fromarray(frame).resize((448, 448), Image.Resampling.BICUBIC), np.float32) / 255
        expected = (resized - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        np.testing.assert_allclose(tile, expected.transpose(2, 0, 1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8 frames"):
        video_pixel_values(frames.astype(np.float32))
    inputs = preprocess_video(videos["mp4"], 3)
    np.testing.assert_array_equal(inputs["pixel_values"], pv)
    assert inputs["num_patches_list"].tolist() == [1, 1, 1]
    assert inputs["frame_indices"].tolist() == uniform_frame_indices(50, 3).tolist()


def test_video_prompt():
    assert video_prompt("What happens?", 3) == (
        "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nWhat happens?"
    )
    mcq = video_prompt("Q?\nA. x\nB. y", 2, mcq=True)
    assert mcq == "Frame-1: <image>\nFrame-2: <image>\nQ?\nA. x\nB. y\nAnswer with the option's letter from the " \
                  "given choices directly."
    assert mcq.endswith(MCQ_INSTRUCTION)
    # The processor's expansion with one tile per frame.
    (expanded,) = chat.expand_images([video_prompt("Q", 16)], [1] * 16)
    assert expanded.count("<img>") == 16 and expanded.count("<IMG_CONTEXT>") == 16 * 256
    assert expanded.startswith("Frame-1: <img><IMG_CONTEXT>") and expanded.endswith("</img>\nQ")
    with pytest.raises(ValueError, match="num_frames"):
        video_prompt("Q", 0)


def test_bad_inputs(tmp_path, videos):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n")
    with pytest.raises(VideoError, match=r"cannot read video file .*notes\.mp4"):
        load_video(text)

    audio = tmp_path / "speech.m4a"
    with av.open(str(audio), "w") as container:
        write_audio(container)
    with pytest.raises(VideoError, match=r"speech\.m4a has no video stream"):
        load_video(audio)

    with pytest.raises(FileNotFoundError, match=r"video file not found: .*missing\.mp4"):
        load_video(tmp_path / "missing.mp4")

    empty = tmp_path / "empty.mkv"  # a video track that holds no frames (only the audio track has packets)
    with av.open(str(empty), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        write_audio(container)
    with pytest.raises(VideoError, match=r"empty\.mkv has no video frames"):
        load_video(empty)

    data = videos["mp4"].read_bytes()  # the index (moov) is written last: a cut copy has none
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"cannot read video file .*cut\.mp4"):
        load_video(cut)

    faststart = write_video(tmp_path / "fast.mp4", 50, options={"movflags": "faststart"})
    data = faststart.read_bytes()  # index first: the cut copy promises 50 frames and holds fewer
    cut_fast = tmp_path / "cut_fast.mp4"
    cut_fast.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(VideoError, match=r"cut_fast\.mp4 is truncated"):
        load_video(cut_fast)
