"""Write generated frames to MP4 (H.264 via imageio-ffmpeg's bundled ffmpeg) or GIF (via PIL), and read them back.

``export_to_video(frames, path, fps=7)`` takes what the pipelines return for one video (``frames[0]``): a list of
PIL images, or an array (F, H, W, 3) of floats in [0, 1] or of uint8.
"""

import dataclasses
import logging
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float


def _ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise ImportError("writing MP4 needs imageio-ffmpeg: pip install imageio-ffmpeg (or write a .gif)") from exc
    return imageio_ffmpeg


def to_uint8_frames(frames):
    """Frames as uint8 (F, H, W, 3): from PIL images, uint8 arrays, or float arrays in [0, 1] (rounded)."""
    if isinstance(frames, PIL.Image.Image):
        raise TypeError("frames must be a sequence of frames; wrap a single image in a list")
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames is empty: nothing to write")
        if all(isinstance(f, PIL.Image.Image) for f in frames):
            frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
        else:
            frames = np.stack([np.asarray(f) for f in frames])
    frames = np.asarray(frames)
    if frames.ndim == 5:
        raise ValueError(
            f"frames has shape {frames.shape}, a batch of videos; export one video at a time (e.g. frames[0])"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (num_frames, height, width, 3) RGB, got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise TypeError(f"frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def _even_size(frames):
    """Pad odd heights/widths by repeating the last row/column: H.264 yuv420p needs even sizes."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        logger.info("padding frames %dx%d to %dx%d for yuv420p (even sizes only)",
                    frames.shape[2], frames.shape[1], frames.shape[2] + pad_w, frames.shape[1] + pad_h)
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _write_mp4(frames, path, fps, crf=18):
    frames = np.ascontiguousarray(_even_size(frames))
    _, height, width, _ = frames.shape
    command = [
        _ffmpeg().get_ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(fps), "-i", "-",
        "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-movflags", "+faststart", str(path),
    ]
    result = subprocess.run(command, input=frames.tobytes(), capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"ffmpeg could not write {path} (exit {result.returncode}): {result.stderr.decode(errors='replace')}"
        )


def _write_gif(frames, path, fps):
    images = [PIL.Image.fromarray(f) for f in frames]
    # GIF stores delays in 1/100 s; identical consecutive frames are merged by PIL.
    duration = max(int(round(1000.0 / fps / 10.0)) * 10, 10)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)


WRITERS = {".mp4": _write_mp4, ".gif": _write_gif}


def export_to_video(frames, path, fps=7):
    """Write ``frames`` to ``path`` (.mp4: H.264 yuv420p; .gif) at ``fps`` frames per second; returns ``path``.

    Odd frame sizes are padded by one edge row/column for MP4 (yuv420p needs even sizes).
    """
    suffix = Path(path).suffix.lower()
    try:
        writer = WRITERS[suffix]
    except KeyError:
        raise ValueError(f"cannot write {path!r}: the suffix must be one of {sorted(WRITERS)}") from None
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = to_uint8_frames(frames)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer(frames, path, fps)
    logger.info("wrote %d frames (%dx%d, %s fps) to %s", len(frames), frames.shape[2], frames.shape[1], fps, path)
    return path


def _read_gif_info(path):
    with PIL.Image.open(path) as image:
        count = getattr(image, "n_frames", 1)
        durations = []
        for index in range(count):
            image.seek(index)
            durations.append(image.info.get("duration", 0))
        width, height = image.size
    mean = float(np.mean(durations)) if durations else 0.0
    return VideoInfo(frames=count, width=width, height=height, fps=1000.0 / mean if mean else 0.0)


def _read_ffmpeg_info(path):
    reader = _ffmpeg().read_frames(str(path))
    try:
        meta = next(reader)
        count = sum(1 for _ in reader)
    finally:
        reader.close()
    width, height = meta["size"]
    return VideoInfo(frames=count, width=int(width), height=int(height), fps=float(meta["fps"]))


READERS = {".gif": _read_gif_info}


def read_video_info(path):
    """Frame count, width, height and fps of a written video (GIF via PIL, others by decoding with ffmpeg)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return READERS.get(Path(path).suffix.lower(), _read_ffmpeg_info)(path)


def read_video_frames(path):
    """All frames of a video as uint8 (F, H, W, 3), decoded with ffmpeg (GIF via PIL)."""
    if Path(path).suffix.lower() == ".gif":
        with PIL.Image.open(path) as image:
            frames = []
            for index in range(getattr(image, "n_frames", 1)):
                image.seek(index)
                frames.append(np.asarray(image.convert("RGB")))
        return np.stack(frames)
    reader = _ffmpeg().read_frames(str(path))
    try:
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader]
    finally:
        reader.close()
    return np.stack(frames)
