"""The framegraph CLI: generate from each kind of artifact, and clear errors for a missing input."""

import subprocess
import sys

from conftest import FIXTURES


def _framegraph(*args):
    return subprocess.run([sys.executable, "-m", "framegraph.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_generate_image_to_video_writes_mp4(svd_artifact, tmp_path):
    from framegraph.runtime.video import read_video_info

    out = tmp_path / "svd.mp4"
    result = _framegraph("generate", svd_artifact, "--image", FIXTURES / "svd-tiny" / "input.png", "--out", out,
                         "--num-frames", 2, "--steps", 1, "--fps", 5)
    assert result.returncode == 0, result.stderr[-2000:]
    info = read_video_info(out)
    assert (info.frames, info.width, info.height) == (2, 32, 32)


def test_generate_text_to_video_writes_gif(t2v_artifact, tmp_path):
    out = tmp_path / "t2v.gif"
    result = _framegraph("generate", t2v_artifact, "--prompt", "a squirrel", "--out", out, "--num-frames", 4,
                         "--steps", 1, "--decode-chunk-size", 3, "--low-memory")
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.stat().st_size > 0
    assert "closing text_encoder" in result.stderr and "closing unet" in result.stderr  # one graph at a time


def test_generate_names_the_missing_input(svd_artifact, tmp_path):
    result = _framegraph("generate", svd_artifact, "--prompt", "x", "--out", tmp_path / "a.mp4")
    assert result.returncode == 2 and "--image" in result.stderr
    result = _framegraph("generate", tmp_path, "--prompt", "x", "--out", tmp_path / "c.mp4")
    assert result.returncode == 2 and "manifest.json" in result.stderr


def test_generate_names_the_missing_prompt(t2v_artifact, tmp_path):
    result = _framegraph("generate", t2v_artifact, "--out", tmp_path / "b.mp4")
    assert result.returncode == 2 and "--prompt" in result.stderr
