"""svd-export guards that refuse before any work: an --out it may not replace, and zero or empty sizes and counts.

No test here compiles a graph: every refusal happens before the model is loaded.
"""

import json

import pytest

from conftest import FIXTURES
from framegraph.export import cli
from framegraph.export.artifact import ArtifactWriter, check_output_folder
from framegraph.export.options import ExportOptions, validate_options
from framegraph.runtime.manifest import Manifest

MODEL = str(FIXTURES / "svd-tiny" / "pipeline")
SIZES = ["--frames", "2", "--height", "32", "--width", "32", "--formats", "onnx", "--no-check"]


def _manifest():
    return Manifest(pipeline="stable-video-diffusion", source={}, toolchain={}, constants={}, scheduler={},
                    defaults={})


def _artifact(folder):
    """A folder that is a framegraph artifact by its manifest, made without exporting."""
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "model.onnx").write_bytes(b"graph")
    _manifest().save(folder)
    return folder


def _web_app(folder):
    """A folder with a manifest.json that is not framegraph's."""
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"name": "app"}))
    (folder / "index.html").write_text("<html>keep me</html>")
    return folder


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- --out that may not be replaced ----------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_foreign_manifest_folder_is_refused_and_untouched(tmp_path, caplog, overwrite):
    out = _web_app(tmp_path / "site")
    before = _snapshot(out)
    assert cli.main([MODEL, "--out", str(out), *SIZES, *overwrite]) == 2
    assert "not a framegraph artifact" in caplog.text and "choose another --out" in caplog.text
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"], "nothing staged next to --out"


def test_non_empty_folder_without_manifest_is_refused(tmp_path, caplog):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main([MODEL, "--out", str(out), *SIZES, "--overwrite"]) == 2
    assert "not a framegraph artifact" in caplog.text and "--out" in caplog.text
    assert _snapshot(out) == {"notes.txt": b"keep me"}


def test_out_that_is_a_file_or_under_a_file_is_a_clear_error(tmp_path, caplog):
    path = tmp_path / "video.mp4"
    path.write_bytes(b"data")
    assert cli.main([MODEL, "--out", str(path), *SIZES]) == 2
    assert "--out" in caplog.text and "is a file" in caplog.text and "choose another --out" in caplog.text
    caplog.clear()
    assert cli.main([MODEL, "--out", str(path / "art"), *SIZES, "--overwrite"]) == 2
    assert "--out" in caplog.text and f"{path} is a file" in caplog.text and "choose another --out" in caplog.text
    assert path.read_bytes() == b"data"


def test_framegraph_artifact_is_replaced_only_with_overwrite(tmp_path, caplog):
    out = _artifact(tmp_path / "art")
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_output_folder(out)
    assert check_output_folder(out, overwrite=True) == "artifact"
    assert cli.main([MODEL, "--out", str(out), *SIZES]) == 2
    assert "already holds a framegraph artifact" in caplog.text and "pass --overwrite" in caplog.text
    assert _snapshot(out) == before


def test_new_and_empty_folders_need_no_overwrite(tmp_path):
    assert check_output_folder(tmp_path / "a" / "b") == "new"
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty") == "empty"


# -- the writer (Python API) and its commit ---------------------------------------------------------------------
def test_writer_refuses_what_the_cli_refuses(tmp_path):
    with pytest.raises(FileExistsError, match="not a framegraph artifact"):
        ArtifactWriter(_web_app(tmp_path / "site"), "fp", overwrite=True)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        ArtifactWriter(_artifact(tmp_path / "art"), "fp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "site"], "nothing staged"


def test_commit_refuses_a_folder_that_changed_during_the_export(tmp_path):
    out = tmp_path / "art"
    writer = ArtifactWriter(out, "fp")
    _web_app(out)  # appeared while the export ran
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="not a framegraph artifact"):
        writer.commit(_manifest())
    writer.abort()
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_commit_refuses_an_artifact_that_appeared_without_overwrite(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    writer = ArtifactWriter(out, "fp")  # empty: fine without --overwrite
    out.rmdir()
    _artifact(out)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        writer.commit(_manifest())
    writer.abort()
    assert (out / "unet" / "model.onnx").read_bytes() == b"graph"


def test_commit_replaces_an_artifact_with_overwrite(tmp_path):
    out = _artifact(tmp_path / "art")
    writer = ArtifactWriter(out, "fp", overwrite=True)
    writer.path("vae/model.onnx").write_bytes(b"new")
    writer.commit(_manifest())
    assert _snapshot(out).keys() == {"manifest.json", "vae/model.onnx"}
    assert Manifest.load(out).options["fingerprint"] == "fp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"], "old artifact and stage removed"


# -- zero and empty sizes and counts -----------------------------------------------------------------------------
BAD_FLAGS = [
    ("--height", "0"), ("--width", "0"), ("--height", "-1"), ("--frames", ""), ("--frames", ","),
    ("--frames", "0"), ("--frames", "2,-3"), ("--batch", "0"), ("--decode-chunk-sizes", ""),
    ("--decode-chunk-sizes", "0"), ("--forward-chunk-size", "0"), ("--width", "abc"),
]


@pytest.mark.parametrize("flag, value", BAD_FLAGS)
def test_non_positive_or_empty_sizes_are_refused_on_the_command_line(tmp_path, capsys, flag, value):
    # a missing model: the old code, which let these through, failed on the model instead (returned 2 without exiting)
    with pytest.raises(SystemExit) as exc:
        cli.main([str(tmp_path / "no-model"), "--out", str(tmp_path / "art"), flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "positive integer" in err
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("field, value, flag", [
    ("height", 0, "--height"), ("width", -8, "--width"), ("batch", 0, "--batch"), ("batch", None, "--batch"),
    ("frames", [], "--frames"), ("frames", [2, 0], "--frames"), ("decode_chunk_sizes", [], "--decode-chunk-sizes"),
    ("decode_chunk_sizes", [0], "--decode-chunk-sizes"), ("forward_chunk_size", 0, "--forward-chunk-size"),
    ("height", 32.0, "--height"), ("frames", "2,3", "--frames"),
])
def test_non_positive_or_empty_sizes_are_refused_by_export_options(field, value, flag):
    with pytest.raises(ValueError, match=flag) as exc:
        ExportOptions(**{field: value})
    assert f"{flag} {value}" not in str(exc.value), "the hint must not suggest the refused value"


def test_validation_also_catches_options_changed_after_construction():
    options = ExportOptions(frames=[2], height=32, width=32)
    options.height = 0
    with pytest.raises(ValueError, match="--height"):
        validate_options(options, 1, "model")


def test_none_means_default_and_overwrite_does_not_change_the_fingerprint():
    ExportOptions(frames=None, height=None, width=None, decode_chunk_sizes=None, forward_chunk_size=None)
    assert ExportOptions(overwrite=True).fingerprint("w") == ExportOptions().fingerprint("w")
