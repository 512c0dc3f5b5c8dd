"""export_to_video: MP4 (H.264 via the bundled ffmpeg) and GIF, read back for frame count, size and fps."""

import numpy as np
import PIL.Image
import pytest

from framegraph.runtime.video import export_to_video, read_video_frames, read_video_info, to_uint8_frames


def ramp_frames(count, height, width):
    """Distinct smooth frames (H.264 keeps them close; GIF keeps distinct frames apart)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = [np.stack([x / max(width - 1, 1), y / max(height - 1, 1), np.full(x.shape, i / count)], -1)
              for i in range(count)]
    return np.stack(frames).astype(np.float32)


@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_mp4_from_float_frames(tmp_path, size):
    frames = ramp_frames(5, *size)
    path = export_to_video(frames, tmp_path / "out.mp4", fps=7)
    assert path == tmp_path / "out.mp4"
    info = read_video_info(path)
    assert (info.frames, info.height, info.width) == (5, *size)
    assert info.fps == pytest.approx(7.0)
    decoded = read_video_frames(path).astype(np.float32) / 255
    assert np.abs(decoded - frames).mean() < 0.02  # lossy, but the same pictures


def test_mp4_from_pil_frames_with_odd_size_is_padded(tmp_path):
    frames = [PIL.Image.fromarray(f) for f in to_uint8_frames(ramp_frames(3, 33, 17))]
    info = read_video_info(export_to_video(frames, str(tmp_path / "odd.mp4"), fps=8))
    assert (info.frames, info.height, info.width, info.fps) == (3, 34, 18, pytest.approx(8.0))


def test_gif_from_uint8_frames(tmp_path):
    frames = to_uint8_frames(ramp_frames(4, 32, 24))
    info = read_video_info(export_to_video(frames, tmp_path / "out.gif", fps=10))
    assert (info.frames, info.height, info.width) == (4, 32, 24)
    assert info.fps == pytest.approx(10.0)
    assert read_video_frames(tmp_path / "out.gif").shape == (4, 32, 24, 3)


def test_gif_fps_is_kept_to_centiseconds(tmp_path):
    info = read_video_info(export_to_video(ramp_frames(3, 8, 8), tmp_path / "seven.gif", fps=7))
    assert info.fps == pytest.approx(1000 / 140)  # 1/7 s stored as 14 centiseconds


def test_float_frames_are_rounded_and_clipped():
    frames = np.array([[[[0.0, 0.5, 1.2]]]], dtype=np.float32)
    np.testing.assert_array_equal(to_uint8_frames(frames), [[[[0, 128, 255]]]])


def test_export_errors(tmp_path):
    frames = ramp_frames(2, 8, 8)
    with pytest.raises(ValueError, match=r"suffix must be one of \['.gif', '.mp4'\]"):
        export_to_video(frames, tmp_path / "out.avi")
    with pytest.raises(ValueError, match="a batch of videos; export one video at a time"):
        export_to_video(frames[None], tmp_path / "out.mp4")
    with pytest.raises(ValueError, match="frames is empty"):
        export_to_video([], tmp_path / "out.mp4")
    with pytest.raises(ValueError, match="fps must be positive"):
        export_to_video(frames, tmp_path / "out.mp4", fps=0)
    with pytest.raises(FileNotFoundError):
        read_video_info(tmp_path / "missing.mp4")
