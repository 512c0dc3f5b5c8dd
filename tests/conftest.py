"""Shared fixtures: the bundled diffusers fixtures and their golden outputs, MindSpore context."""

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# Set before any test module imports Ray (Ray reads them at import, and the processes it starts inherit them): every
# Ray process of the tests binds and advertises 127.0.0.1 only, whatever routes the machine has, and reports nothing.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# ONNX Runtime sessions are built from the artifacts as they are, in this process and the ones it starts: whether a
# graph was already built (and cached) by an earlier test must not change what a later one measures. The cache
# itself is tested on folders of its own (test_ort_cache.py).
os.environ["FRAMEGRAPH_ORT_CACHE"] = "off"


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


@pytest.fixture(scope="session")
def svd_tiny():
    return FIXTURES / "svd-tiny" / "pipeline"


@pytest.fixture(scope="session")
def svd_golden():
    return dict(np.load(FIXTURES / "svd-tiny" / "golden.npz"))


@pytest.fixture(scope="session")
def svd_golden_call():
    with open(FIXTURES / "svd-tiny" / "golden.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def t2v_tiny():
    return FIXTURES / "t2v-tiny" / "pipeline"


@pytest.fixture(scope="session")
def t2v_golden():
    return dict(np.load(FIXTURES / "t2v-tiny" / "golden.npz"))


@pytest.fixture(scope="session")
def ms():
    """MindSpore in GRAPH_MODE on CPU (the mode that export compiles); skips where it is not installed."""
    mindspore = pytest.importorskip("mindspore", reason="needs MindSpore: pip install -e '.[export]'")
    mindspore.set_device("CPU")
    mindspore.set_context(mode=mindspore.GRAPH_MODE)
    return mindspore


# -- running in parallel (pytest -n 2 --dist loadgroup) ------------------------------------------------------------
# The tiny exports are the slow part of the suite (MindSpore graph compiles, mostly on one core). The tests that use
# one of them run on one worker (xdist group), the rest are spread over the workers, and an export one worker made
# is reused by the others (a test using both artifacts may run anywhere).
ARTIFACT_GROUPS = {"svd_artifact": "svd-artifact", "t2v_artifact": "t2v-artifact",
                   "svd_cache_artifact": "svd-cache-artifact"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        groups = [g for fixture, g in ARTIFACT_GROUPS.items() if fixture in item.fixturenames]
        if len(groups) == 1:
            item.add_marker(pytest.mark.xdist_group(groups[0]))


def shared_export(tmp_path_factory, name, export):
    """``export(folder)`` run once per test run: by this process without xdist, else by the first worker that
    asks (the others wait for it, under a file lock, and reuse its folder)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return export(tmp_path_factory.mktemp("artifacts") / name)
    root = tmp_path_factory.getbasetemp().parent  # shared by the workers of one run
    folder = root / "shared-artifacts" / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "manifest.json").is_file():
            export(folder)
    return folder


@pytest.fixture(scope="session")
def lite_install():
    """MindSpore Lite set up as `framegraph setup-lite` does (the first run fetches the PyPI wheel's libraries into
    the cache and builds the shim; later runs reuse them)."""
    from framegraph.runtime.lite.install import setup_lite

    return setup_lite()


ARTIFACT_FORMATS = ("onnx", "mindir", "mslite")
SVD_EXPORT = {"frames": [2, 3], "height": 32, "width": 32, "decode_chunk_sizes": [1, 2]}


@pytest.fixture(scope="session")
def svd_artifact(tmp_path_factory, ms, svd_tiny, lite_install):
    """The tiny SVD exported once per session (ONNX + MindIR + MindSpore Lite, frame buckets 2 and 3, decode chunks
    1 and 2)."""
    from framegraph.export.pipeline_folder import PipelineFolder
    from framegraph.export.options import ExportOptions
    from framegraph.export.stable_video_diffusion import export_stable_video_diffusion

    options = ExportOptions(formats=ARTIFACT_FORMATS, **SVD_EXPORT)
    return shared_export(tmp_path_factory, "svd-tiny",
                         lambda out: export_stable_video_diffusion(PipelineFolder(svd_tiny), out, options))


T2V_EXPORT = {"frames": [4], "height": 32, "width": 32, "decode_chunk_sizes": [3]}
T2V_CACHE_BRANCH = 1
SVD_CACHE_BRANCH = 0


@pytest.fixture(scope="session")
def t2v_artifact(tmp_path_factory, ms, t2v_tiny, lite_install):
    """The tiny text-to-video model exported once per session (ONNX + MindIR + MindSpore Lite, 4 frames, decode
    slices of 3), with the step-caching graphs of branch 1."""
    from framegraph.export.pipeline_folder import PipelineFolder
    from framegraph.export.options import ExportOptions
    from framegraph.export.text_to_video_sd import export_text_to_video_sd

    options = ExportOptions(formats=ARTIFACT_FORMATS, cache_branch=T2V_CACHE_BRANCH, **T2V_EXPORT)
    return shared_export(tmp_path_factory, "t2v-tiny",
                         lambda out: export_text_to_video_sd(PipelineFolder(t2v_tiny), out, options))


@pytest.fixture(scope="session")
def svd_cache_artifact(tmp_path_factory, ms, svd_tiny):
    """The tiny SVD as an AnimateLCM-SVD-xt model would come (the same UNet architecture, its scheduler folder the
    published AnimateLCM sampler's), exported unchanged with the step-caching graphs of branch 0 (ONNX, 2 frames):
    one export per session."""
    import shutil

    from framegraph.export.pipeline_folder import PipelineFolder
    from framegraph.export.options import ExportOptions
    from framegraph.export.stable_video_diffusion import export_stable_video_diffusion

    options = ExportOptions(formats=("onnx",), frames=[2], height=32, width=32, cache_branch=SVD_CACHE_BRANCH)

    def export(out):
        folder = tmp_path_factory.mktemp("animatelcm-svd-tiny")
        shutil.copytree(svd_tiny, folder, dirs_exist_ok=True)
        shutil.copy(FIXTURES / "animatelcm-svd" / "scheduler" / "scheduler_config.json",
                    folder / "scheduler" / "scheduler_config.json")
        return export_stable_video_diffusion(PipelineFolder(folder), out, options)

    return shared_export(tmp_path_factory, "svd-tiny-cache", export)
