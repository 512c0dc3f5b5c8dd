"""A load hashes each artifact file once per machine: a file already checked and unchanged since (size, mtime, ctime,
inode, device) is not hashed again, and any change to it makes the next load hash it again (see hash_record)."""

import os

import pytest

from framegraph.runtime import manifest as manifest_module
from framegraph.runtime.artifact import Artifact
from framegraph.runtime.hash_record import HashRecord
from framegraph.runtime.manifest import ArtifactError, Manifest, file_entry, verify_files

from test_manifest_trust import build_onnx, write_manifest


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An artifact folder with a weights file, and a cache folder of its own for the record."""
    monkeypatch.setenv("FRAMEGRAPH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "artifact"
    folder.mkdir()
    build_onnx(folder / "unet.onnx")
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 64)
    write_manifest(folder, [file_entry(folder, "unet.onnx"), file_entry(folder, "weights.bin")])
    return folder


@pytest.fixture
def hashed(monkeypatch):
    """The paths sha256_file is called on, in order (the real function still runs)."""
    calls = []
    real = manifest_module.sha256_file

    def counting(path, *args, **kwargs):
        calls.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(manifest_module, "sha256_file", counting)
    return calls


def files_of(folder):
    return Manifest.load(folder).graphs[0].files


def test_a_second_load_does_not_hash_unchanged_files(folder, hashed):
    Artifact(folder, "test")
    assert sorted(hashed) == ["unet.onnx", "weights.bin"]
    assert HashRecord(folder).path.is_file()
    hashed.clear()
    Artifact(folder, "test")
    assert hashed == []


def test_a_file_rewritten_with_the_same_size_and_mtime_is_hashed_again_and_refused(folder, hashed):
    verify_files(folder, files_of(folder))
    weights = folder / "weights.bin"
    before = os.stat(weights)
    weights.write_bytes(b"\x00" * before.st_size)  # same size, other bytes
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back; ctime cannot be
    hashed.clear()
    with pytest.raises(ArtifactError, match=r"weights\.bin does not match its sha256"):
        verify_files(folder, files_of(folder))
    assert hashed == ["weights.bin"]
    with pytest.raises(ArtifactError, match=r"weights\.bin does not match its sha256"):
        verify_files(folder, files_of(folder))  # a failed check is never recorded as passed


def test_a_file_replaced_by_another_is_hashed_again(folder, hashed):
    verify_files(folder, files_of(folder))
    weights = folder / "weights.bin"
    copy = folder.parent / "copy.bin"
    copy.write_bytes(weights.read_bytes())
    os.replace(copy, weights)  # same bytes, another inode: checked again, and passes
    hashed.clear()
    verify_files(folder, files_of(folder))
    assert hashed == ["weights.bin"]


def test_verify_full_hashes_every_file_and_false_none(folder, hashed):
    verify_files(folder, files_of(folder))
    hashed.clear()
    verify_files(folder, files_of(folder), verify="full")
    assert sorted(hashed) == ["unet.onnx", "weights.bin"]
    hashed.clear()
    verify_files(folder, files_of(folder), verify=False)
    assert hashed == []
    with pytest.raises(ValueError, match="verify='yes': pass True, False or 'full'"):
        verify_files(folder, files_of(folder), verify="yes")


def test_a_record_of_another_folder_or_a_broken_one_is_ignored(folder, hashed, tmp_path):
    verify_files(folder, files_of(folder))
    record = HashRecord(folder)
    record.path.write_text("{not json")
    hashed.clear()
    verify_files(folder, files_of(folder))  # hashed again, and the record rewritten
    assert sorted(hashed) == ["unet.onnx", "weights.bin"]
    moved = tmp_path / "moved"
    folder.rename(moved)  # the record is keyed by the folder: a moved artifact is hashed again
    hashed.clear()
    verify_files(moved, files_of(moved))
    assert sorted(hashed) == ["unet.onnx", "weights.bin"]


def test_an_unwritable_cache_still_checks_every_file(folder, hashed, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("FRAMEGRAPH_CACHE", str(blocker))
    for _ in range(2):
        verify_files(folder, files_of(folder))
    assert sorted(hashed) == ["unet.onnx", "unet.onnx", "weights.bin", "weights.bin"]
    assert blocker.read_text() == "a file where the cache folder would go"


def test_serve_takes_the_check_from_its_flags():
    from framegraph.runtime.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["serve", "a"]).verify is True
    assert parse(["serve", "a", "--no-verify"]).verify is False
    assert parse(["serve", "a", "--verify-full"]).verify == "full"
    with pytest.raises(SystemExit):
        parse(["serve", "a", "--no-verify", "--verify-full"])


def test_the_export_records_its_files_so_the_first_load_hashes_none(folder, tmp_path, hashed):
    """svd-export's last step (ArtifactWriter.commit) hashes the files where they now lie, which records the checks:
    the first load of the new artifact hashes none of them. (Not tested on the shared tiny export: other tests link
    its files, which changes their ctime and rightly makes a load hash them again.)"""
    from framegraph.export.artifact import ArtifactWriter

    out = tmp_path / "exported"
    writer = ArtifactWriter(out, "fingerprint")
    for name in ("unet.onnx", "weights.bin"):
        writer.path(name).write_bytes((folder / name).read_bytes())
    files = [writer.entry(writer.path(name)) for name in ("unet.onnx", "weights.bin")]
    write_manifest(writer.stage, files)
    hashed.clear()  # file_entry hashed them in the staging folder
    writer.commit(Manifest.load(writer.stage))
    assert sorted(hashed) == ["unet.onnx", "weights.bin"]  # the commit hashed them in place
    hashed.clear()
    verify_files(out, Manifest.load(out).all_files())
    assert hashed == []


def test_records_of_removed_folders_are_deleted_when_another_is_written(folder, tmp_path):
    """A record whose artifact folder is gone is deleted; the records of existing folders and other files stay."""
    import shutil
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    verify_files(other, Manifest.load(other).all_files())
    records = HashRecord(other).path.parent
    stray = records / "notes.json"
    stray.write_text("{}")
    shutil.rmtree(other)
    verify_files(folder, Manifest.load(folder).all_files())
    assert sorted(p.name for p in records.iterdir()) == sorted([HashRecord(folder).path.name, "notes.json"])
