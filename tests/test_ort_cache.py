"""ONNX Runtime's optimized graphs cached per machine (runtime/backends/ort_cache.py), on a copy of the shipped demo
artifact and a cache folder of each test's own."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from framegraph.runtime.backends.onnxruntime import OnnxRuntimeBackend
from framegraph.runtime.backends.ort_cache import OptimizedGraphs, default_cache_dir, graph_key
from framegraph.runtime.demo import DEMO_ARTIFACT, DEMO_IMAGE
from framegraph.runtime.manifest import Manifest

BUILT = "built from its optimized form"
UNET = {"num_frames": 2, "batch": 2, "height": 32, "width": 32}


@pytest.fixture
def artifact(tmp_path):
    return Path(shutil.copytree(DEMO_ARTIFACT, tmp_path / "artifact"))


def _unet(artifact):
    return Manifest.load(artifact).find("unet", "onnx", **UNET)


def _feeds(entry):
    rng = np.random.default_rng(0)
    return {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in entry.inputs}


def _open(artifact, cache, caplog):
    caplog.clear()
    backend = OnnxRuntimeBackend(cache_dir=cache)
    graph = backend.open(artifact, _unet(artifact))
    graph.mapped_files = {Path(key[0]).resolve() for key in backend._mapped._weights.keys()}
    return graph, BUILT in caplog.text


def test_a_second_session_is_built_from_the_cache_and_gives_the_same_numbers(artifact, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="framegraph.runtime.backends.onnxruntime")
    cache = tmp_path / "cache"
    entry = _unet(artifact)
    feeds = _feeds(entry)
    plain = OnnxRuntimeBackend(cache_dir=False).open(artifact, entry).run(feeds)
    assert not cache.exists()

    first, from_cache = _open(artifact, cache, caplog)
    assert not from_cache and len(list((cache / "graphs").iterdir())) == 1
    blobs = list((cache / "blobs").glob("*.bin"))
    assert blobs, "the reordered convolution weights are kept as blobs"
    assert not list((cache / "tmp").iterdir()), "the saved graph's scratch folder is removed"

    second, from_cache = _open(artifact, cache, caplog)
    assert from_cache
    # the cached session reads every weight from a mapping: the artifact's, and the blobs for the derived ones
    files = second.mapped_files
    assert (artifact / "unet" / "weights.bin").resolve() in files and {b.resolve() for b in blobs} <= files
    assert len(second._loaded._read_in_place) == len(second._loaded._mapped)  # read on every run: prefetched
    for name, value in plain.items():
        np.testing.assert_array_equal(first.run(feeds)[name], value)
        np.testing.assert_array_equal(second.run(feeds)[name], value)


def test_the_pipeline_on_cached_sessions_equals_diffusers(artifact, tmp_path, svd_golden, svd_golden_call):
    from PIL import Image

    from framegraph.runtime import StableVideoDiffusionPipeline

    kwargs = dict(svd_golden_call["pipeline_call"], latents=svd_golden["pipeline.latents"],
                  image_noise=svd_golden["pipeline.image_noise"], output_type="np")
    image = Image.open(DEMO_IMAGE).convert("RGB")
    for attempt in ("fills the cache", "reads it"):
        pipe = StableVideoDiffusionPipeline.from_artifacts(artifact, cache_dir=tmp_path / "cache")
        pipe.set_progress_bar_config(disable=True)
        error = float(np.abs(pipe(image, **kwargs).frames - svd_golden["pipeline.frames"]).max())
        assert error <= 2e-3, f"the run that {attempt}: max abs error {error:.2e} against diffusers"


@pytest.mark.parametrize("damage", ["truncated blob", "weight list", "unknown weight", "garbled graph"])
def test_an_entry_that_no_longer_resolves_is_rebuilt_not_used(artifact, tmp_path, caplog, damage):
    caplog.set_level(logging.INFO, logger="framegraph.runtime.backends")
    cache = tmp_path / "cache"
    entry = _unet(artifact)
    expected = OnnxRuntimeBackend(cache_dir=False).open(artifact, entry).run(_feeds(entry))
    _open(artifact, cache, caplog)
    folder = next((cache / "graphs").iterdir())
    record = json.loads((folder / "entry.json").read_text())
    if damage == "truncated blob":
        blob = next((cache / "blobs").glob("*.bin"))
        with open(blob, "r+b") as f:
            f.truncate(blob.stat().st_size // 2)
    elif damage == "weight list":
        record["weights"].pop(next(iter(record["weights"])))
    elif damage == "unknown weight":
        source = next(w for w in record["weights"].values() if "artifact" in w)
        source["artifact"] = "no-such-weight"
    else:
        (folder / "model.onnx").write_bytes(b"not a graph")
    (folder / "entry.json").write_text(json.dumps(record))

    graph, from_cache = _open(artifact, cache, caplog)
    assert not from_cache and "ignoring" in caplog.text
    for name, value in expected.items():
        np.testing.assert_array_equal(graph.run(_feeds(entry))[name], value)
    _, from_cache = _open(artifact, cache, caplog)  # the entry was written again
    assert from_cache


def test_the_key_follows_the_files_the_settings_and_onnx_runtime(artifact):
    import onnxruntime

    entry = _unet(artifact)
    key = graph_key(onnxruntime, artifact, entry, {"optimization": "all"})
    assert key == graph_key(onnxruntime, artifact, entry, {"optimization": "all"})
    assert key != graph_key(onnxruntime, artifact, entry, {"optimization": "extended"})

    class Newer:
        __version__ = onnxruntime.__version__ + ".1"

    assert key != graph_key(Newer, artifact, entry, {"optimization": "all"})
    weights = artifact / "unet" / "weights.bin"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten in place
    assert key != graph_key(onnxruntime, artifact, entry, {"optimization": "all"})


def test_entries_of_removed_artifacts_and_their_blobs_are_pruned(artifact, tmp_path, caplog):
    cache = tmp_path / "cache"
    other = Path(shutil.copytree(artifact, tmp_path / "other"))
    os.utime(other / "unet" / "weights.bin")  # another mtime: an entry of its own
    _open(artifact, cache, caplog)
    _open(other, cache, caplog)
    assert len(list((cache / "graphs").iterdir())) == 2
    stray = cache / "blobs" / ("0" * 64 + ".bin")
    stray.write_bytes(b"x")
    young = cache / "blobs" / ("1" * 64 + ".bin")
    young.write_bytes(b"x")
    foreign = cache / "blobs" / "notes.bin"
    foreign.write_bytes(b"x")
    for path in (stray, foreign):
        os.utime(path, (1, 1))
    shutil.rmtree(other)
    OptimizedGraphs(cache).prune()
    graphs = list((cache / "graphs").iterdir())
    assert len(graphs) == 1 and json.loads((graphs[0] / "entry.json").read_text())["source"].startswith(
        str(artifact.resolve()))
    assert not stray.exists() and young.exists() and foreign.exists()  # old unnamed blob gone; others kept
    _, from_cache = _open(artifact, cache, caplog)
    assert from_cache  # the blobs the kept entry names are still there


def test_scratch_folders_of_ended_processes_are_removed(tmp_path):
    cache = OptimizedGraphs(tmp_path / "cache")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tmp = tmp_path / "cache" / "tmp"
    dead = tmp / f"{int(ended.stdout)}-0123abcd"
    live = tmp / f"{os.getpid()}-0123abcd"
    other = tmp / "mine-not-yours"
    for path in (dead, live, other):
        path.mkdir(parents=True)
    scratch = cache.scratch(1)
    assert scratch is not None and scratch.is_dir()
    assert not dead.exists() and live.exists() and other.exists()


def test_an_unusable_cache_folder_leaves_the_session_as_without_it(artifact, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="framegraph.runtime.backends")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    entry = _unet(artifact)
    expected = OnnxRuntimeBackend(cache_dir=False).open(artifact, entry).run(_feeds(entry))
    graph = OnnxRuntimeBackend(cache_dir=blocker / "cache").open(artifact, entry)
    assert "not caching the optimized graph" in caplog.text
    for name, value in expected.items():
        np.testing.assert_array_equal(graph.run(_feeds(entry))[name], value)


def test_the_cache_is_off_where_the_environment_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("FRAMEGRAPH_CACHE", str(tmp_path))
    monkeypatch.setenv("FRAMEGRAPH_ORT_CACHE", "off")
    assert default_cache_dir() is None and OnnxRuntimeBackend()._cache is None
    monkeypatch.delenv("FRAMEGRAPH_ORT_CACHE")
    assert default_cache_dir() == tmp_path / "onnxruntime"
    assert OnnxRuntimeBackend()._cache.root == tmp_path / "onnxruntime"


def test_from_artifacts_caches_by_default_and_not_with_cache_dir_false(artifact, monkeypatch, tmp_path):
    from framegraph.runtime import StableVideoDiffusionPipeline

    monkeypatch.setenv("FRAMEGRAPH_CACHE", str(tmp_path / "home-cache"))
    monkeypatch.delenv("FRAMEGRAPH_ORT_CACHE")
    off = StableVideoDiffusionPipeline.from_artifacts(artifact, cache_dir=False)
    off.artifact.graph("unet", **UNET)
    assert not (tmp_path / "home-cache" / "onnxruntime").exists()
    on = StableVideoDiffusionPipeline.from_artifacts(artifact)
    on.artifact.graph("unet", **UNET)
    assert list((tmp_path / "home-cache" / "onnxruntime" / "graphs").iterdir())
