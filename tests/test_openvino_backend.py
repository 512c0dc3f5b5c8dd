"""The openvino backend on the real OpenVINO runtime: the artifact's ONNX graphs, checked against the manifest,
its model cache, and its refusals. The golden parity of both pipelines on it is in test_pipeline_svd,
test_pipeline_t2v and test_step_cache (the backend is one of their parameters)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from framegraph.runtime.backends import BackendUnavailableError, load_backend
from framegraph.runtime.manifest import ArtifactError, Manifest

pytest.importorskip("openvino")


def _unet(folder):
    return next(g for g in Manifest.load(folder).graphs if g.format == "onnx" and g.name == "unet")


def _feeds(entry):
    rng = np.random.default_rng(0)
    return {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in entry.inputs}


def test_every_onnx_graph_opens_and_equals_onnxruntime(svd_artifact):
    """Each ONNX graph of the artifact, fed the same inputs, gives ONNX Runtime's outputs within 1e-4."""
    ov, ort = load_backend("openvino"), load_backend("onnxruntime")
    entries = [g for g in Manifest.load(svd_artifact).graphs if g.format == "onnx"]
    assert {g.name for g in entries} >= {"image_encoder", "vae_encoder", "unet", "vae_decoder"}
    for entry in entries:
        feeds = _feeds(entry)
        if entry.name == "vae_decoder":
            feeds = {k: v * 0.1 for k, v in feeds.items()}
        got = ov.open(svd_artifact, entry)(**feeds)
        want = ort.open(svd_artifact, entry)(**feeds)
        for name in want:
            scale = max(1.0, float(np.abs(want[name]).max()))
            assert np.abs(got[name] - want[name]).max() <= 1e-4 * scale, f"{entry.key} {name}"


def test_an_edited_manifest_shape_is_refused_when_opened(svd_artifact):
    entry = _unet(svd_artifact)
    entry.inputs[0].shape = [d + 1 for d in entry.inputs[0].shape]
    with pytest.raises(ArtifactError, match="the graph file has"):
        load_backend("openvino").open(svd_artifact, entry)


def test_the_model_cache_is_written_and_reused(svd_artifact, tmp_path):
    """With ``cache_dir`` a compiled graph is stored there, and a second backend (as a new process would) opens it
    from the cache with the same outputs."""
    entry = _unet(svd_artifact)
    feeds = _feeds(entry)
    first = load_backend("openvino", cache_dir=tmp_path / "cache").open(svd_artifact, entry)(**feeds)
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached, "nothing was cached"
    again = load_backend("openvino", cache_dir=tmp_path / "cache").open(svd_artifact, entry)(**feeds)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached  # read, not written again
    np.testing.assert_array_equal(again["noise_pred"], first["noise_pred"])


@pytest.mark.parametrize("options, message", [
    ({"device": "cuda"}, "device='cpu'"),
    ({"precision": "f16"}, "precision='f16': use one of f32, bf16"),
    ({"num_threads": 0}, "num_threads=0"),
])
def test_bad_options_are_refused_naming_what_to_pass(options, message):
    with pytest.raises(ValueError) as exc:
        load_backend("openvino", **options)
    assert message in str(exc.value)


def test_without_openvino_the_backend_names_the_extra():
    code = textwrap.dedent("""
        import sys
        sys.modules["openvino"] = None
        from framegraph.runtime.backends import load_backend
        load_backend("openvino")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert BackendUnavailableError.__name__ in result.stderr and "framegraph[openvino]" in result.stderr
