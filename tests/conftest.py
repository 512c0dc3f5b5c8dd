"""Shared fixtures: the bundled diffusers fixtures and their golden outputs, MindSpore context."""

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


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
    mindspore.set_context(mode=mindspore.GRAPH_MODE, device_target="CPU")
    return mindspore


SVD_EXPORT = {"frames": [2, 3], "height": 32, "width": 32, "decode_chunk_sizes": [1, 2]}


@pytest.fixture(scope="session")
def svd_artifact(tmp_path_factory, ms, svd_tiny):
    """The tiny SVD exported once per session (ONNX + MindIR, frame buckets 2 and 3, decode chunks 1 and 2)."""
    from framegraph.export.components import PipelineFolder
    from framegraph.export.pipeline_export import ExportOptions
    from framegraph.export.svd import export_svd

    out = tmp_path_factory.mktemp("artifacts") / "svd-tiny"
    options = ExportOptions(formats=("onnx", "mindir"), **SVD_EXPORT)
    return export_svd(PipelineFolder(svd_tiny), out, options)


T2V_EXPORT = {"frames": [4], "height": 32, "width": 32, "decode_chunk_sizes": [3]}


@pytest.fixture(scope="session")
def t2v_artifact(tmp_path_factory, ms, t2v_tiny):
    """The tiny text-to-video model exported once per session (ONNX + MindIR, 4 frames, decode slices of 3)."""
    from framegraph.export.components import PipelineFolder
    from framegraph.export.pipeline_export import ExportOptions
    from framegraph.export.t2v import export_t2v

    out = tmp_path_factory.mktemp("artifacts") / "t2v-tiny"
    return export_t2v(PipelineFolder(t2v_tiny), out, ExportOptions(formats=("onnx", "mindir"), **T2V_EXPORT))
