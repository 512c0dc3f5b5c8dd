"""Exporting components in child processes (``--isolate``), which real-size exports need to fit in memory."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from framegraph.runtime.backends.onnxruntime import OnnxRuntimeBackend
from framegraph.runtime.backends.ort_attention import fuse_attention
from framegraph.runtime.manifest import Manifest


def test_isolated_forward_chunked_export_equals_in_process_export(t2v_artifact, t2v_tiny, tmp_path):
    """Three export options on one export (each tiny export costs a minute): ``isolate="always"`` builds every graph
    in a child process, ``forward_chunk_size`` compiles diffusers' enable_forward_chunking into the UNet graph, and
    a 10 MB ``attention_slice_mb`` takes the UNet's first-level self-attentions (32 MB of float32 scores: the 8
    frames of the guidance batch, 1024 positions) in slices of 320 queries, and the decoder's (12 MB: 3 frames) in
    slices of 853; the other attentions fit whole. None may change a weight or a number. The UNet's attentions,
    sliced or whole, all run as ONNX Runtime's fused kernel (ort_attention) with the same numbers."""
    import onnx

    from conftest import T2V_CACHE_BRANCH, T2V_EXPORT
    from framegraph.export.pipeline_folder import PipelineFolder
    from framegraph.export.options import ExportOptions
    from framegraph.export.text_to_video_sd import export_text_to_video_sd

    options = ExportOptions(formats=("onnx",), isolate="always", forward_chunk_size=128, attention_slice_mb=10,
                            cache_branch=T2V_CACHE_BRANCH, **T2V_EXPORT)  # the step-caching graphs as the shared one
    out = export_text_to_video_sd(PipelineFolder(t2v_tiny), tmp_path / "isolated", options)
    isolated, in_process = Manifest.load(out), Manifest.load(t2v_artifact)
    assert not (out / ".scratch").exists()
    assert isolated.options["forward_chunk_size"] == 128
    assert isolated.options["attention_slice_mb"] == 10
    assert in_process.options["attention_slice_mb"] == 1024  # the default: these attentions are whole
    onnx_graphs = [g for g in in_process.graphs if g.format == "onnx"]
    assert sorted(g.key for g in isolated.graphs) == sorted(g.key for g in onnx_graphs)

    def matmuls(path):
        return sum(n.op_type in ("MatMul", "Gemm") for n in onnx.load(str(path), load_external_data=False).graph.node)

    for reference in onnx_graphs:
        graph = isolated.find(reference.name, "onnx", **reference.bucket)
        assert graph.max_abs_error is not None and graph.max_abs_error <= graph.tolerance
        if graph.name.startswith("unet"):  # feed-forward and attention over slices: more matrix products, same numbers
            assert matmuls(out / graph.main_file) > matmuls(t2v_artifact / reference.main_file)
            _assert_same_weights(out / graph.main_file, t2v_artifact / reference.main_file)
        else:  # children rebuilt the same weights and appended to one shared weights file, in the same order
            weights = {f.path: f.sha256 for f in graph.files if f.path.endswith("weights.bin")}
            assert weights == {f.path: f.sha256 for f in reference.files if f.path.endswith("weights.bin")}
        feeds = {t.name: np.random.default_rng(0).standard_normal(t.shape).astype(t.dtype) for t in graph.inputs}
        if graph.name == "text_encoder":
            feeds = {t.name: np.arange(np.prod(t.shape)).reshape(t.shape).astype(t.dtype) % 50 for t in graph.inputs}
        ours = ort.InferenceSession(str(out / graph.main_file)).run(None, feeds)
        theirs = ort.InferenceSession(str(t2v_artifact / reference.main_file)).run(None, feeds)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        if graph.name.startswith("unet"):  # the sliced attention runs as ONNX Runtime's fused kernel, same numbers
            fused = fuse_attention(onnx.load(str(out / graph.main_file), load_external_data=False))
            assert fused == sum(n.op_type == "Softmax" for n in onnx.load(
                str(t2v_artifact / reference.main_file), load_external_data=False).graph.node)
            outputs = OnnxRuntimeBackend().open(out, graph).run(feeds).values()
            for a, b in zip(outputs, theirs):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def _assert_same_weights(chunked, whole):
    """The weights of two UNet graphs are the same tensors. In the forward-chunked one each GEGLU projection is
    shared by the slices and stored whole; the unchunked export stores it as the two halves of its rows
    (``fold_linear``), named ``NAME[start:stop]``."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    def load(path):  # the tensors in weights.bin; the graphs' own small constants differ with their structure
        external = {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer
                    if uses_external_data(t)}
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.name in external}

    ours, theirs = load(chunked), load(whole)
    halves = {}
    for name in theirs:
        if name.endswith("]") and "[" in name:
            source, rows = name[:-1].rsplit("[", 1)
            halves.setdefault(source, []).append((int(rows.split(":")[0]), name))
    accounted = set()
    for name, array in ours.items():
        if name in theirs:
            parts = [name]
        else:
            assert name in halves, f"{name} is in the chunked graph only"
            parts = [part for _, part in sorted(halves[name])]
        expected = theirs[name] if parts == [name] else np.concatenate([theirs[p] for p in parts])
        np.testing.assert_array_equal(array, expected, err_msg=name)
        accounted.update(parts)
    assert accounted == set(theirs), f"only in the unchunked graph: {sorted(set(theirs) - accounted)[:5]}"


def test_child_error_is_raised_in_the_parent():
    from framegraph.export.child import run_in_child
    from helpers import fail_with_value_error

    with pytest.raises(ValueError, match="bad bucket 7"):
        run_in_child("a test", fail_with_value_error, "bad bucket 7")


def test_killed_child_is_reported_with_the_graph_and_signal():
    from framegraph.export.child import ExportChildDied, run_in_child
    from helpers import kill_own_process

    with pytest.raises(ExportChildDied, match=r"unet\[f4\]\.mindir was killed by SIGKILL.*out of memory"):
        run_in_child("unet[f4].mindir", kill_own_process)


def test_auto_isolates_only_large_components(svd_tiny, monkeypatch):
    from framegraph.export import isolation
    from framegraph.export.pipeline_folder import PipelineFolder

    pipeline = PipelineFolder(svd_tiny)
    assert not isolation.should_isolate(pipeline, "unet", "auto")
    assert isolation.should_isolate(pipeline, "unet", "always")
    assert not isolation.should_isolate(pipeline, "unet", "never")
    monkeypatch.setattr(isolation, "AUTO_MIN_BYTES", pipeline.parameter_bytes("unet"))
    assert isolation.should_isolate(pipeline, "unet", "auto")
    assert not isolation.should_isolate(pipeline, "vae", "auto")
    assert isolation.should_isolate(pipeline, "vae", "auto", probed=True)  # checked on probe sizes
    assert not isolation.should_isolate(pipeline, "vae", "never", probed=True)


def test_child_exits_when_the_export_is_killed(tmp_path):
    """A SIGKILLed export must not leave its child process running (and writing) on its own."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    import psutil

    marker = tmp_path / "written"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from framegraph.export.child import run_in_child
        from helpers import sleep_then_write
        run_in_child("a test", sleep_then_write, {str(marker)!r}, 8)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    children = []
    while time.time() < deadline and not children:
        children = [c for c in psutil.Process(parent.pid).children() if "framegraph.export.child" in " ".join(
            c.cmdline())]
        time.sleep(0.1)
    assert children, "the child process did not start"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, "the child kept running after its parent was killed"
    time.sleep(8)
    assert not marker.exists()
