"""MindSpore Lite 2.0 driven natively (runtime/lite) and ONNX graphs converted for it (export/lite_*), against the
real Lite libraries: ``setup_lite()`` downloads the PyPI wheel once into the cache and builds the shims.

Each rewrite of export/lite_rewrites.py is shown to be needed (Lite fails or is wrong on the original graph) and
sufficient (Lite then matches ONNX Runtime on the original graph), and every graph of the tiny SVD demo artifact
converts and matches. Lite runs in child processes (``run_lite``), as the exporter runs it; the wrapper tests load it
into this process and skip in a worker that has MindSpore loaded (the two cannot share a process).
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from framegraph.export.lite_convert import LiteConvertError, convert_to_lite, run_lite
from framegraph.export.lite_rewrites import make_lite_safe
from framegraph.runtime.demo import DEMO_ARTIFACT
from framegraph.runtime.lite import install as lite_install
from framegraph.runtime.lite.native import LiteError, LiteModel
from framegraph.runtime.manifest import Manifest

pytestmark = pytest.mark.xdist_group("lite")

TOLERANCE = 1e-5  # absolute, times max(1, max |reference|)
WRONG = 100 * TOLERANCE  # Lite on a graph left as it is counts as wrong past this error
HANG_S = 20  # a run of a graph left as it is that takes this long (tiny graphs run in milliseconds) hangs


@pytest.fixture(scope="session")
def lite(lite_install):
    """The real Lite install (conftest: downloaded and built on first use, then found in the cache)."""
    return lite_install


@pytest.fixture
def in_process(lite):
    """Lite loaded into this process: skipped in a worker that imported MindSpore (they cannot share a process);
    ``test_native_tests_run_in_a_fresh_process`` then runs these tests in a process of their own."""
    if "mindspore" in sys.modules:
        pytest.skip("MindSpore is loaded in this worker; Lite cannot share its process")
    return lite


def test_native_tests_run_in_a_fresh_process(lite):
    """The in-process tests (``test_native_*``) in a fresh pytest process, where MindSpore is not loaded: they must
    all run and pass there, whatever this worker imported before."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                             __file__, "-k", "test_native_ and not fresh_process"], capture_output=True, text=True,
                            timeout=600, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]


def make_model(nodes, inputs, outputs, initializers=None, opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def onnxruntime_run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model))
    return session.run(None, feeds)


def max_error(outputs, references):
    """The largest |output - reference| over max(1, max |reference|); inf where a shape differs or a value is NaN."""
    worst = 0.0
    for out, ref in zip(outputs, references):
        if out.shape != ref.shape:
            return float("inf")
        error = float(np.abs(out.astype(np.float64) - ref).max()) / max(1.0, float(np.abs(ref).max()))
        worst = max(worst, error if np.isfinite(error) else float("inf"))
    return worst


# -- graphs that Lite computes wrongly unless rewritten ------------------------------------------------------------

def _normal(rng, shape, scale=1.0, offset=0.0):
    return (rng.standard_normal(shape) * scale + offset).astype(np.float32)


def _resize(attrs, size_input, out_shape):
    def build(rng):
        name, value = size_input
        inputs = ["x", "", name] if name == "scales" else ["x", "", "", name]
        model = make_model([helper.make_node("Resize", inputs, ["y"], **attrs)], [("x", [1, 2, 4, 5])],
                           [("y", out_shape)], {name: value})
        return model, {"x": _normal(rng, [1, 2, 4, 5])}
    return build


def _layer_norm(shape, axis, epsilon, bias):
    def build(rng):
        width = shape[axis:]
        init = {"scale": _normal(rng, width)}
        if bias:
            init["bias"] = _normal(rng, width)
        node = helper.make_node("LayerNormalization", ["x", *init], ["y"], axis=axis, epsilon=epsilon)
        return make_model([node], [("x", shape)], [("y", shape)], init), {"x": _normal(rng, shape, 0.5, 0.2)}
    return build


def _cos(rng):
    x = np.linspace(-10, 10, 1001, dtype=np.float32)
    return make_model([helper.make_node("Cos", ["x"], ["y"])], [("x", [1001])], [("y", [1001])]), {"x": x}


def _conv_without_kernel_shape(rng):
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 3, 5, 6])], [("y", [1, 8, 3, 4])],
                       {"w": _normal(rng, [8, 3, 3, 3], 0.3)})
    return model, {"x": _normal(rng, [1, 3, 5, 6])}


def _conv_matmul_softmax(rng):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3],
                              strides=[1, 1], dilations=[1, 1]),
             helper.make_node("MatMul", ["c", "m"], ["d"]),
             helper.make_node("Softmax", ["d"], ["y"], axis=-1)]
    init = {"w": _normal(rng, [8, 3, 3, 3], 0.3), "b": _normal(rng, [8]), "m": _normal(rng, [6, 7])}
    return make_model(nodes, [("x", [1, 3, 5, 6])], [("y", [1, 8, 5, 7])], init), {"x": _normal(rng, [1, 3, 5, 6])}


def _constant_slice(rng):
    """CLIP's position embeddings: a Slice of a constant added to the token embeddings (folded by the rewrite)."""
    nodes = [helper.make_node("Gather", ["w", "ids"], ["e"]), helper.make_node("Slice", ["p", "starts", "ends"], ["s"]),
             helper.make_node("Add", ["e", "s"], ["y"])]
    init = {"w": _normal(rng, [50, 4]), "p": _normal(rng, [10, 4]), "starts": np.array([0], np.int64),
            "ends": np.array([5], np.int64)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 4])],
                              [numpy_helper.from_array(v, k) for k, v in init.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"ids": rng.integers(0, 50, (1, 5)).astype(np.int32)}


SCALES_X2 = ("scales", np.array([1, 1, 2, 2], np.float32))
NEEDS_REWRITE = {
    # no mode: ONNX means nearest, Lite runs linear
    "resize_without_mode": _resize({}, SCALES_X2, [1, 2, 8, 10]),
    # ONNX's defaults written out: Lite ignores round_prefer_floor under half_pixel
    "resize_nearest_defaults_explicit": _resize(
        dict(mode="nearest", coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_floor"),
        SCALES_X2, [1, 2, 8, 10]),
    "resize_nearest_sizes": _resize({"mode": "nearest"}, ("sizes", np.array([1, 2, 7, 3], np.int64)), [1, 2, 7, 3]),
    # floor(4 * 1.5, 5 * 1.5) = (6, 7); Lite makes (6, 8)
    "resize_nearest_fractional_scales": _resize({}, ("scales", np.array([1, 1, 1.5, 1.5], np.float32)), [1, 2, 6, 7]),
    # Lite's default coordinate mode is not ONNX's half_pixel
    "resize_linear_default_coordinates": _resize({"mode": "linear"}, SCALES_X2, [1, 2, 8, 10]),
    "layer_norm_bias_epsilon": _layer_norm([2, 5, 16], -1, 0.1, bias=True),
    "layer_norm_without_bias": _layer_norm([2, 5, 16], -1, 1e-5, bias=False),
    "layer_norm_axis_1": _layer_norm([2, 3, 4, 5], 1, 1e-2, bias=True),
    "cos": _cos,
    "conv_without_kernel_shape": _conv_without_kernel_shape,
}
# computed right with or without the rewrites (the folded Slice alone does not make Lite hang; CLIP's whole text
# encoder does: test_lite_backend's text-to-video test runs it)
CASES = {**NEEDS_REWRITE, "conv_matmul_softmax": _conv_matmul_softmax, "constant_slice": _constant_slice}


def _case(name, tmp_path):
    model, feeds = CASES[name](np.random.default_rng(sorted(CASES).index(name)))
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return model, feeds, path


@pytest.mark.parametrize("name", sorted(CASES))
def test_rewrite_keeps_onnx_semantics(name, tmp_path):
    model, feeds, _ = _case(name, tmp_path)
    before = model.SerializeToString()
    rewritten = make_lite_safe(model)
    assert model.SerializeToString() == before, "make_lite_safe must leave its argument as it is"
    assert max_error(onnxruntime_run(rewritten, feeds), onnxruntime_run(model, feeds)) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(CASES))
def test_lite_matches_onnxruntime(lite, name, tmp_path):
    model, feeds, path = _case(name, tmp_path)
    (ms_path,) = convert_to_lite(path, tmp_path / f"{name}.ms", install=lite)
    outputs = run_lite(ms_path, list(feeds.values()), install=lite)
    assert max_error(outputs, onnxruntime_run(model, feeds)) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(NEEDS_REWRITE))
def test_lite_is_wrong_without_rewrite(lite, name, tmp_path):
    model, feeds, path = _case(name, tmp_path)
    try:
        (ms_path,) = convert_to_lite(path, tmp_path / f"{name}.ms", install=lite, rewrite=False)
        outputs = run_lite(ms_path, list(feeds.values()), install=lite, timeout=HANG_S)
        error = max_error(outputs, onnxruntime_run(model, feeds))
    except LiteConvertError:
        return  # refused to convert or to run
    except subprocess.TimeoutExpired:
        return  # never returned from predict
    assert error > WRONG, f"Lite now computes {name} right without the rewrite (error {error:.2g})"


def test_fractional_linear_resize_is_refused():
    model, _ = _resize({"mode": "linear"}, ("scales", np.array([1, 1, 1.5, 1.5], np.float32)), [1, 2, 6, 7])(
        np.random.default_rng(0))
    with pytest.raises(ValueError, match="non-integer sizes.*'sizes' input"):
        make_lite_safe(model)


# -- the tiny SVD artifact ---------------------------------------------------------------------------------------

SVD_GRAPHS = Manifest.load(DEMO_ARTIFACT).graphs


@pytest.mark.parametrize("entry", SVD_GRAPHS, ids=[g.key for g in SVD_GRAPHS])
def test_svd_tiny_graph_matches_onnxruntime(lite, entry, tmp_path):
    source = DEMO_ARTIFACT / entry.main_file
    (ms_path,) = convert_to_lite(source, tmp_path / f"{entry.name}.ms", install=lite)
    rng = np.random.default_rng(SVD_GRAPHS.index(entry))
    feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in entry.inputs}
    outputs = run_lite(ms_path, feeds, num_threads=2, install=lite)
    assert [list(o.shape) for o in outputs] == [s.shape for s in entry.outputs]
    assert max_error(outputs, onnxruntime_run(source, feeds)) <= TOLERANCE


# -- the ctypes wrapper ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_inputs(lite, tmp_path_factory):
    """A converted model with inputs sample [1, 3, 4, 5] and scale [1] (float32), outputs scaled and shifted."""
    folder = tmp_path_factory.mktemp("lite-native")
    model = make_model([helper.make_node("Mul", ["sample", "scale"], ["scaled"]),
                        helper.make_node("Add", ["scaled", "shift"], ["shifted"])],
                       [("sample", [1, 3, 4, 5]), ("scale", [1])],
                       [("scaled", [1, 3, 4, 5]), ("shifted", [1, 3, 4, 5])], {"shift": np.float32(0.5)})
    onnx.save(model, folder / "two.onnx")
    return convert_to_lite(folder / "two.onnx", folder / "two.ms", install=lite)[0]


def test_native_model_reads_and_runs(in_process, two_inputs):
    with LiteModel(two_inputs, num_threads=1, install=in_process) as model:
        assert model.inputs() == [("sample", "float32", [1, 3, 4, 5]), ("scale", "float32", [1])]
        assert model.outputs() == [("scaled", "float32", [1, 3, 4, 5]), ("shifted", "float32", [1, 3, 4, 5])]
        sample = np.random.default_rng(0).standard_normal([1, 3, 4, 5]).astype(np.float32)
        scaled, shifted = model.predict([sample, np.array([3], np.float32)])
        np.testing.assert_allclose(scaled, 3 * sample, rtol=1e-6)
        np.testing.assert_allclose(shifted, 3 * sample + 0.5, rtol=1e-6)


@pytest.mark.parametrize("arrays, message", [
    ([np.zeros([1, 3, 4, 5], np.float32)], r"takes 2 inputs \(sample, scale\), got 1"),
    ([np.zeros([1, 3, 4, 5], np.float64), np.zeros([1], np.float32)], r"input 'sample' .* takes float32, got float64"),
    ([np.zeros([1, 3, 4, 5], np.float32), np.zeros([2], np.float32)], r"input 'scale' .* takes shape \[1\], got \[2\]"),
])
def test_native_predict_checks_inputs(in_process, two_inputs, arrays, message):
    with LiteModel(two_inputs, install=in_process) as model:
        with pytest.raises(ValueError, match=message):
            model.predict(arrays)


def test_native_model_errors(in_process, two_inputs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no MindSpore Lite model at .*missing.ms.*convert_to_lite"):
        LiteModel(tmp_path / "missing.ms", install=in_process)
    (tmp_path / "garbage.ms").write_bytes(b"not a model" * 100)
    with pytest.raises(LiteError, match="garbage.ms"):
        LiteModel(tmp_path / "garbage.ms", install=in_process)
    model = LiteModel(two_inputs, install=in_process)
    model.close()
    model.close()
    with pytest.raises(LiteError, match="closed"):
        model.predict([np.zeros([1, 3, 4, 5], np.float32), np.zeros([1], np.float32)])


def test_native_predict_from_threads(in_process, two_inputs):
    samples = [np.full([1, 3, 4, 5], i, np.float32) for i in range(8)]
    results = [None] * len(samples)
    with LiteModel(two_inputs, install=in_process) as model:
        def work(i):
            for _ in range(20):
                results[i] = model.predict([samples[i], np.array([2], np.float32)])[0]
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(samples))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, np.full([1, 3, 4, 5], 2 * i, np.float32))


# -- install -----------------------------------------------------------------------------------------------------

def test_mslite_home_without_headers(tmp_path, monkeypatch):
    (tmp_path / "lite").mkdir()
    monkeypatch.setenv("MSLITE_HOME", str(tmp_path / "lite"))
    with pytest.raises(lite_install.LiteSetupError, match="no MindSpore Lite C\\+\\+ headers .*set MSLITE_HOME"):
        lite_install.setup_lite(cache_dir=tmp_path / "cache")
    assert lite_install.find_lite(cache_dir=tmp_path / "cache") is None
    monkeypatch.setenv("MSLITE_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(lite_install.LiteSetupError, match="does not exist"):
        lite_install.setup_lite(cache_dir=tmp_path / "cache")


def test_setup_without_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("MSLITE_HOME", raising=False)
    with pytest.raises(lite_install.LiteSetupError, match="framegraph setup-lite"):
        lite_install.setup_lite(cache_dir=tmp_path / "cache", download=False)


def test_setup_reuses_the_cache(lite, monkeypatch):
    monkeypatch.delenv("MSLITE_HOME", raising=False)
    built = lite.shim.stat().st_mtime_ns

    def no_commands(command, *args, **kwargs):
        raise AssertionError(f"a second setup ran {command}")

    monkeypatch.setattr(lite_install.subprocess, "run", no_commands)  # no pip download, no compile
    start = time.perf_counter()
    assert lite_install.setup_lite() == lite
    assert lite_install.find_lite() == lite
    assert time.perf_counter() - start < 1
    assert lite.shim.stat().st_mtime_ns == built


def test_official_package_layout(lite, tmp_path, monkeypatch):
    """An official tarball's layout (runtime/{include,lib}, tools/converter/lib) is found and built against; a half
    build left by an interrupted setup is not taken for a finished one; a missing compiler is named."""
    monkeypatch.delenv("MSLITE_HOME", raising=False)
    home = tmp_path / "mindspore-lite-2.0.0-linux-x64"
    (home / "runtime").mkdir(parents=True)
    (home / "tools" / "converter").mkdir(parents=True)
    (home / "runtime" / "include").symlink_to(lite.lib_dir.parent / "include")
    (home / "runtime" / "lib").symlink_to(lite.lib_dir)
    (home / "tools" / "converter" / "lib").symlink_to(lite.lib_dir)
    cache = tmp_path / "cache"
    (cache / ".build-interrupted").mkdir(parents=True)
    (cache / ".build-interrupted" / lite_install.RUNTIME_SHIM).write_bytes(b"half")
    assert lite_install.find_lite(mslite_home=home, cache_dir=cache) is None
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(lite_install.LiteSetupError, match=r"install g\+\+ \(apt install g\+\+"):
        lite_install.setup_lite(mslite_home=home, cache_dir=cache, download=False)
    monkeypatch.delenv("CXX")
    install = lite_install.setup_lite(mslite_home=home, cache_dir=cache, download=False)
    assert not (cache / ".build-interrupted").exists(), "setup should clear an interrupted setup's staging folders"
    assert install.lib_dir == home / "runtime" / "lib" and install.shim.is_file() and install.converter.is_file()
    assert lite_install.find_lite(mslite_home=home, cache_dir=cache) == install
    model, feeds = _conv_matmul_softmax(np.random.default_rng(0))
    onnx.save(model, tmp_path / "graph.onnx")
    (ms_path,) = convert_to_lite(tmp_path / "graph.onnx", tmp_path / "graph.ms", install=install)
    outputs = run_lite(ms_path, feeds, install=install)
    assert max_error(outputs, onnxruntime_run(model, feeds)) <= TOLERANCE
    assert os.access(ms_path, os.R_OK)
