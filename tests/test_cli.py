"""The framegraph CLI: generate from each kind of artifact, and clear errors for a missing input."""

from conftest import FIXTURES
from helpers import run_cli as _framegraph


def test_generate_image_to_video_writes_mp4(svd_artifact, tmp_path):
    from framegraph.runtime.video import read_video_info

    out = tmp_path / "svd.mp4"
    result = _framegraph("generate", svd_artifact, "--image", FIXTURES / "svd-tiny" / "input.png", "--out", out,
                         "--num-frames", 2, "--steps", 1, "--fps", 5)
    assert result.returncode == 0, result.stderr[-2000:]
    info = read_video_info(out)
    assert (info.frames, info.width, info.height) == (2, 32, 32)
    # one call: the UNet reads the shared mapped weights, it does not load and pack its own (a shorter load)
    assert "pack_exclusive" not in result.stderr and "released" in result.stderr and "building unet" in result.stderr


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


# -- every argument is checked before any graph is opened, and the error names its flag ----------------------------
def _refused(caplog, capsys, argv, flag):
    """``framegraph argv`` exits with 2 before opening a graph, without a traceback, and its error (logged, or
    argparse's on stderr) names ``flag``; returns the error text."""
    from framegraph.runtime.cli import main

    caplog.clear()
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    text = caplog.text + capsys.readouterr().err
    assert code == 2, text
    assert "opening" not in text, "a graph was opened before the argument was refused"
    assert "Traceback" not in text and " at 0x" not in text
    assert flag in text, text
    return text


def test_generate_refuses_bad_arguments_before_opening_a_graph(caplog, capsys, tmp_path):
    from framegraph.runtime.demo import DEMO_ARTIFACT, DEMO_IMAGE

    base = ["generate", DEMO_ARTIFACT, "--image", DEMO_IMAGE, "--out", tmp_path / "v.mp4"]
    _refused(caplog, capsys, base + ["--num-frames", 3], "--num-frames")
    assert "available: 2, 4" in caplog.text
    _refused(caplog, capsys, base + ["--num-frames", 4, "--decode-chunk-size", 3], "--decode-chunk-size")
    _refused(caplog, capsys, base[:-2] + ["--out", tmp_path / "v.avi"], "--out")
    _refused(caplog, capsys, base[:-2] + ["--out", tmp_path], "--out")
    _refused(caplog, capsys, base + ["--guidance-scale", 2], "--guidance-scale")
    not_an_image = tmp_path / "not-an-image.png"
    not_an_image.write_text("hello")
    text = _refused(caplog, capsys, base[:3] + [not_an_image] + base[4:], "--image")
    assert "not an image" in text
    _refused(caplog, capsys, base[:3] + [tmp_path / "missing.png"] + base[4:], "--image")
    for flag, value in (("--fps", 0), ("--steps", 0), ("--num-frames", -1), ("--threads", 0), ("--fps", "")):
        _refused(caplog, capsys, base + [flag, value], f"argument {flag}")
    assert not (tmp_path / "v.mp4").exists()


def test_generate_text_to_video_takes_the_artifacts_defaults(t2v_artifact, tmp_path, caplog, capsys):
    """No --num-frames: the artifact's 4 frames (it has no bucket for diffusers' 16); the video plays at 8 fps, as
    the server writes it."""
    from framegraph.runtime.video import read_video_info

    out = tmp_path / "t2v.mp4"
    result = _framegraph("generate", t2v_artifact, "--prompt", "a squirrel", "--out", out, "--steps", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    info = read_video_info(out)
    assert (info.frames, info.fps) == (4, 8.0)
    base = ["generate", t2v_artifact, "--prompt", "x", "--out", tmp_path / "b.mp4"]
    _refused(caplog, capsys, base + ["--fps", 0], "argument --fps")
    _refused(caplog, capsys, base + ["--motion-bucket-id", 3], "--motion-bucket-id")
    _refused(caplog, capsys, base + ["--num-frames", 16], "--num-frames")
    assert not (tmp_path / "b.mp4").exists()
