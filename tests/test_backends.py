"""Backends: the registry, the exact feed checks, ONNX Runtime / MindSpore runs, MindSpore Lite wiring, isolation."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from framegraph.runtime.backends import (
    BackendUnavailableError,
    GraphInputError,
    OnnxRuntimeBackend,
    available_backends,
    backends_for_format,
    load_backend,
)
from framegraph.runtime.manifest import ArtifactError, GraphEntry, Manifest, TensorSpec, file_entry
from helpers import tiny_onnx_model

SHAPE = [1, 2, 3]
INPUTS = [TensorSpec("sample", "float32", SHAPE), TensorSpec("timestep", "float32", [])]
OUTPUTS = [TensorSpec("out", "float32", SHAPE), TensorSpec("doubled", "float32", SHAPE)]
BUCKET = {"num_frames": 2}


def expected(sample, timestep):
    return {"out": sample * timestep + np.float32(1.0), "doubled": sample * np.float32(2.0)}


def feeds(seed=0):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal(SHAPE).astype(np.float32), "timestep": np.array(3.0, dtype=np.float32)}


def build_onnx(path):
    """The tiny graph of ``helpers.tiny_onnx_model`` at ``path``."""
    onnx = pytest.importorskip("onnx")
    model = tiny_onnx_model(SHAPE, SHAPE)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_artifact(folder, graph_file, fmt, inputs=INPUTS, outputs=OUTPUTS, extra_files=()):
    entry = GraphEntry(
        name="unet", format=fmt, bucket=dict(BUCKET),
        files=[file_entry(folder, graph_file), *(file_entry(folder, f) for f in extra_files)],
        inputs=list(inputs), outputs=list(outputs),
    )
    Manifest(pipeline="test", source={}, toolchain={}, constants={}, scheduler={}, defaults={},
             graphs=[entry]).save(folder)
    return Manifest.load(folder).find("unet", fmt, **BUCKET)


@pytest.fixture
def onnx_artifact(tmp_path):
    build_onnx(tmp_path / "unet.onnx")
    return tmp_path, write_artifact(tmp_path, "unet.onnx", "onnx")


@pytest.fixture
def onnx_graph(onnx_artifact):
    folder, entry = onnx_artifact
    return load_backend("onnxruntime").open(folder, entry)


# -- registry ---------------------------------------------------------------------------------------------------
def test_registry_lists_the_backends_by_format():
    assert available_backends() == ["mindspore", "mindspore_lite", "onnxruntime", "openvino"]
    assert backends_for_format("onnx") == ["onnxruntime", "openvino"]
    assert backends_for_format("mindir") == ["mindspore"]
    assert backends_for_format("mslite") == ["mindspore_lite"]


def test_unknown_backend_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'tensorrt'; available: mindspore, mindspore_lite, onnx"):
        load_backend("tensorrt")


def test_a_backend_returns_a_loaded_graph_that_the_graph_delegates_to(onnx_artifact):
    """Graph checks the feeds, then hands run(shrink=...) to the backend's LoadedGraph; the memory methods give 0
    unless the backend maps weights. A _load that returns anything else is refused with what to return."""
    from framegraph.runtime.backends import Backend, LoadedGraph

    class Doubling(LoadedGraph):
        def __init__(self):
            super().__init__(native="engine object")
            self.shrinks = []

        def run(self, arrays, shrink=False):
            self.shrinks.append(shrink)
            return [arrays[0] * arrays[1] + np.float32(1.0), arrays[0] * np.float32(2.0)]

    class Stub(Backend):
        name, format = "stub", "onnx"

        def _load(self, path, entry, exclusive, streamed):
            return self.loaded

    folder, entry = onnx_artifact
    backend = Stub()
    backend.loaded = Doubling()
    graph = backend.open(folder, entry)
    inputs = feeds()
    graph.run(inputs)
    out = graph.run(inputs, shrink=True)
    np.testing.assert_array_equal(out["doubled"], expected(**inputs)["doubled"])
    assert backend.loaded.shrinks == [False, True]
    assert graph.native == "engine object" and graph.release_memory() == 0 and graph.prefetch_memory() == 0
    backend.loaded = (lambda arrays: arrays, None)
    with pytest.raises(TypeError, match="Stub._load returned tuple; it must return a LoadedGraph"):
        backend.open(folder, entry)


# -- ONNX Runtime -----------------------------------------------------------------------------------------------
def test_onnxruntime_runs_and_keys_outputs_by_manifest_names(onnx_graph):
    inputs = feeds()
    out = onnx_graph(**inputs)
    assert list(out) == ["out", "doubled"]
    for name, ref in expected(**inputs).items():
        assert out[name].dtype == np.float32 and out[name].shape == tuple(SHAPE)
        np.testing.assert_allclose(out[name], ref, rtol=1e-6, atol=1e-6)


def test_onnxruntime_session_options(onnx_artifact):
    folder, entry = onnx_artifact
    backend = load_backend("onnxruntime", num_threads=1)
    assert backend.providers == ["CPUExecutionProvider"]
    options = backend.open(folder, entry).native.get_session_options()
    assert options.intra_op_num_threads == 1
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_ALL")
    # the memory pattern: off for a graph on the shared arena (a UNet's), on for one with its own arena
    assert options.get_session_config_entry("session.use_env_allocators") == "1"
    assert not options.enable_mem_pattern
    assert load_backend("onnxruntime", shared_arena=False).open(folder, entry).native.get_session_options(
        ).enable_mem_pattern
    assert load_backend("onnxruntime", memory_pattern=True).open(folder, entry).native.get_session_options(
        ).enable_mem_pattern


def test_onnxruntime_buffer_reuse_is_off_on_cpu_unless_asked(onnx_artifact):
    """The planner's reuse of dead activations' buffers holds them across the layers in between: off on CPU."""
    folder, entry = onnx_artifact
    assert not load_backend("onnxruntime").open(folder, entry).native.get_session_options().enable_mem_reuse
    assert load_backend("onnxruntime", memory_reuse=True).open(folder, entry).native.get_session_options(
        ).enable_mem_reuse
    backend = load_backend("onnxruntime")
    backend.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # the decision, without a GPU
    assert backend.session_options().enable_mem_reuse  # ONNX Runtime's default where not measured
    backend.memory_reuse = False
    assert not backend.session_options().enable_mem_reuse


def test_onnxruntime_memory_pattern_is_off_on_cuda(onnx_artifact):
    backend = load_backend("onnxruntime", shared_arena=False)
    assert backend.session_options().enable_mem_pattern
    backend.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # the decision, without a GPU
    assert not backend.session_options().enable_mem_pattern
    backend.memory_pattern = True
    assert backend.session_options().enable_mem_pattern


def test_onnxruntime_provider_options_reach_the_session_and_a_provider_not_used_is_refused(onnx_artifact):
    folder, entry = onnx_artifact
    backend = load_backend("onnxruntime", provider_options={"CPUExecutionProvider": {}})
    assert backend.provider_options == [{}]
    assert backend.open(folder, entry).native.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match=r"provider_options names \['CUDAExecutionProvider'\], which this backend "
                                         r"does not use \(it uses \['CPUExecutionProvider'\]\)"):
        load_backend("onnxruntime", device="cpu", provider_options={"CUDAExecutionProvider": {"device_id": 0}})


def test_float32_io_casts_floating_feeds_to_a_float16_graph_and_its_outputs_back(tmp_path):
    """A graph opened by a backend takes exactly the manifest's dtypes; the artifact's graphs (float32_io, which
    the pipelines run) cast float32 feeds to a float16 graph's inputs and give float32 outputs."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, numpy_helper

    model = tiny_onnx_model(SHAPE, SHAPE)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    onnx.save(model, str(tmp_path / "unet.onnx"))
    half = [TensorSpec(s.name, "float16", s.shape) for s in INPUTS]
    entry = write_artifact(tmp_path, "unet.onnx", "onnx", half, [TensorSpec(s.name, "float16", s.shape)
                                                                 for s in OUTPUTS])
    graph = load_backend("onnxruntime").open(tmp_path, entry)
    inputs = feeds()
    with pytest.raises(GraphInputError, match=r"input 'sample' expected dtype float16.*got dtype float32"):
        graph(**inputs)
    graph.float32_io = True
    out = graph(**inputs)
    reference = expected(**{k: v.astype(np.float16) for k, v in inputs.items()})
    for name, ref in reference.items():
        assert out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], ref.astype(np.float32), rtol=2e-3, atol=0)  # float16 rounding


def test_low_memory_turns_onnxruntime_memory_pattern_off_unless_asked(onnx_artifact):
    folder, entry = onnx_artifact
    backend = load_backend("onnxruntime", low_memory=True)
    assert not backend.memory_pattern
    assert not backend.open(folder, entry).native.get_session_options().enable_mem_pattern
    assert load_backend("onnxruntime", low_memory=True, memory_pattern=True).memory_pattern
    assert load_backend("onnxruntime").memory_pattern is None  # decided per graph


def test_onnxruntime_devices(caplog):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert load_backend("onnxruntime", device="cuda").providers[0] == "CUDAExecutionProvider"
    else:
        assert load_backend("onnxruntime", device="cuda").providers == ["CPUExecutionProvider"]
        assert "CUDAExecutionProvider" in caplog.text
        with pytest.raises(BackendUnavailableError, match="none of the execution providers"):
            load_backend("onnxruntime", providers=["CUDAExecutionProvider"])
    with pytest.raises(ValueError, match="device 'tpu' is not supported by the onnxruntime backend"):
        load_backend("onnxruntime", device="tpu")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.pop("timestep"), r"missing: \['timestep'\], unexpected: none"),
        (lambda f: f.update(latents=f["sample"]), r"missing: none, unexpected: \['latents'\]"),
        (lambda f: f.update(sample=f["sample"].astype(np.float64)),
         r"input 'sample' expected dtype float32, shape \[1, 2, 3\], got dtype float64, shape \[1, 2, 3\]"),
        (lambda f: f.update(sample=f["sample"][..., :2]),
         r"input 'sample' expected dtype float32, shape \[1, 2, 3\], got dtype float32, shape \[1, 2, 2\]"),
        (lambda f: f.update(timestep=np.array([3.0], dtype=np.float32)),
         r"input 'timestep' expected dtype float32, shape \[\], got dtype float32, shape \[1\]"),
        (lambda f: f.update(timestep=3.0), r"input 'timestep' must be a numpy array .* got a float"),
    ],
    ids=["missing", "unexpected", "dtype", "shape", "scalar-shape", "not-an-array"],
)
def test_feeds_are_checked_exactly(onnx_graph, change, message):
    bad = feeds()
    change(bad)
    with pytest.raises(GraphInputError, match=message) as info:
        onnx_graph(**bad)
    assert "graph unet/onnx/num_frames=2" in str(info.value)


def test_numpy_scalars_are_accepted(onnx_graph):
    inputs = feeds()
    out = onnx_graph(sample=inputs["sample"], timestep=np.float32(3.0))
    np.testing.assert_allclose(out["out"], expected(**inputs)["out"], rtol=1e-6)


def test_format_mismatch_and_missing_file(onnx_artifact, tmp_path):
    folder, entry = onnx_artifact
    backend = OnnxRuntimeBackend()
    entry.format = "mindir"
    with pytest.raises(ArtifactError, match="runs 'onnx' graphs"):
        backend.open(folder, entry)
    entry.format = "onnx"
    (folder / "unet.onnx").rename(folder / "moved.onnx")
    with pytest.raises(ArtifactError, match="unet.onnx missing from"):
        backend.open(folder, entry)


def test_manifest_that_disagrees_with_the_graph_is_refused(tmp_path):
    build_onnx(tmp_path / "unet.onnx")
    renamed = [TensorSpec("latents", "float32", SHAPE), INPUTS[1]]
    entry = write_artifact(tmp_path, "unet.onnx", "onnx", inputs=renamed)
    with pytest.raises(ArtifactError, match=r"has inputs \['sample', 'timestep'\].*lists inputs \['latents', 'time"):
        load_backend("onnxruntime").open(tmp_path, entry)


def test_outputs_that_disagree_with_the_manifest_are_refused(tmp_path):
    build_onnx(tmp_path / "unet.onnx")
    wrong = [TensorSpec("out", "float32", [1, 2, 4]), OUTPUTS[1]]
    entry = write_artifact(tmp_path, "unet.onnx", "onnx", outputs=wrong)
    with pytest.raises(ArtifactError, match=r"output 'out': the manifest says dtype float32, shape \[1, 2, 4\], the "
                       "graph file has"):  # at open, before any call
        load_backend("onnxruntime").open(tmp_path, entry)


def test_runtime_imports_and_runs_onnx_without_mindspore_torch_diffusers(onnx_artifact):
    folder, _ = onnx_artifact
    code = textwrap.dedent(
        """
        import sys
        sys.modules["mindspore"] = None  # any import of mindspore now fails
        import numpy as np
        import framegraph.runtime, framegraph.runtime.backends, framegraph.runtime.image, framegraph.runtime.video
        from framegraph.runtime.backends import load_backend
        from framegraph.runtime.manifest import Manifest
        folder = sys.argv[1]
        graph = load_backend("onnxruntime").open(folder, Manifest.load(folder).find("unet", "onnx", num_frames=2))
        out = graph(sample=np.ones((1, 2, 3), np.float32), timestep=np.array(2.0, np.float32))
        assert float(out["out"].max()) == 3.0, out
        try:
            load_backend("mindspore")
        except ImportError as exc:
            print("mindspore refused:", type(exc).__name__)
        heavy = sorted(m for m, module in sys.modules.items()
                       if module is not None and m.split(".")[0] in ("torch", "diffusers", "mindspore", "mindspore_lite"))
        print("heavy:", heavy)
        """
    )
    result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "mindspore refused: BackendUnavailableError" in result.stdout
    assert "heavy: []" in result.stdout


# -- MindSpore --------------------------------------------------------------------------------------------------
@pytest.mark.mindspore
def test_mindspore_backend_runs_an_exported_mindir(ms, tmp_path):
    class Tiny(ms.nn.Cell):
        def construct(self, sample, timestep):
            return sample * timestep + 1.0, sample * 2.0

    inputs = feeds(1)
    ms.export(Tiny(), *(ms.Tensor(inputs[s.name]) for s in INPUTS), file_name=str(tmp_path / "unet"),
              file_format="MINDIR")
    entry = write_artifact(tmp_path, "unet.mindir", "mindir")
    graph = load_backend("mindspore", device="cpu").open(tmp_path, entry)
    out = graph(**inputs)
    assert list(out) == ["out", "doubled"]
    for name, ref in expected(**inputs).items():
        np.testing.assert_allclose(out[name], ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(GraphInputError, match="input 'sample' expected dtype float32"):
        graph(sample=inputs["sample"].astype(np.float16), timestep=inputs["timestep"])


@pytest.mark.mindspore
def test_mindspore_backend_runs_a_split_mindir(ms, tmp_path, monkeypatch):
    """Big graphs export as NAME_graph.mindir + NAME_variables/; the manifest's first file is the graph file."""
    import mindspore.train.serialization as serialization

    class Scaled(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.weight = ms.Parameter(ms.Tensor(np.arange(6, dtype=np.float32).reshape(1, 2, 3)), name="weight")

        def construct(self, sample, timestep):
            return sample * timestep + self.weight, sample * 2.0

    monkeypatch.setattr(serialization, "TOTAL_SAVE", 0)  # force the split layout that graphs over 1 GB get
    inputs = feeds(4)
    ms.export(Scaled(), *(ms.Tensor(inputs[s.name]) for s in INPUTS), file_name=str(tmp_path / "unet"),
              file_format="MINDIR")
    variables = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "unet_variables").iterdir())
    assert not (tmp_path / "unet.mindir").exists() and variables
    entry = write_artifact(tmp_path, "unet_graph.mindir", "mindir", extra_files=variables)
    out = load_backend("mindspore").open(tmp_path, entry)(**inputs)
    weight = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    np.testing.assert_allclose(out["out"], inputs["sample"] * inputs["timestep"] + weight, rtol=1e-6, atol=1e-6)


def test_mindspore_backend_rejects_unknown_device():
    with pytest.raises(ValueError, match="device 'tpu' is not supported by the mindspore backend"):
        load_backend("mindspore", device="tpu")


def test_onnxruntime_optimization_level_is_selectable():
    import onnxruntime as ort

    from framegraph.runtime.backends import load_backend

    levels = ort.GraphOptimizationLevel
    assert load_backend("onnxruntime").session_options().graph_optimization_level == levels.ORT_ENABLE_ALL
    extended = load_backend("onnxruntime", optimization="extended")
    assert extended.session_options().graph_optimization_level == levels.ORT_ENABLE_EXTENDED
    with pytest.raises(ValueError, match="optimization='fastest'.*all, extended, basic"):
        load_backend("onnxruntime", optimization="fastest")


def test_weights_of_constant_subgraphs_are_not_counted_as_read_in_place(tmp_path):
    """A Gemm fed only by constants is folded by ONNX Runtime at build: its weight is not prefetched for the runs;
    the Gemm on the graph input reads its weight in place."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from framegraph.runtime.backends.ort_weights import FOLDED, MappedWeights, reads_in_place

    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal((16, 16)).astype(np.float32) for name in ("w_run", "w_fold", "pos")}
    nodes = [helper.make_node("Gemm", ["pos", "w_fold"], ["embed"], transB=1),
             helper.make_node("Gemm", ["x", "w_run"], ["h"], transB=1),
             helper.make_node("Add", ["h", "embed"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 16])],
                              initializer=[numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    mapped = {name: ops for name, _, ops in MappedWeights().initializers(path, ort)}
    assert mapped == {"w_run": {"Gemm"}, "w_fold": {FOLDED}, "pos": {FOLDED}}
    assert reads_in_place(mapped["w_run"], "all") and not reads_in_place(mapped["w_fold"], "all")


def _matmul_artifact(folder, quantize):
    """y = x @ w with w (64 x 32) in an external weights file, as float or as ONNX Runtime's int8 MatMulInteger."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir()
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 32])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(folder / "float.onnx"), save_as_external_data=True, location="float.bin", size_threshold=0)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(folder / "float.onnx"), str(folder / "unet.onnx"), weight_type=QuantType.QInt8,
                         use_external_data_format=True)
        assert "MatMulInteger" in {n.op_type for n in onnx.load(str(folder / "unet.onnx")).graph.node}
    else:
        (folder / "float.onnx").rename(folder / "unet.onnx")
    data = [p.name for p in folder.iterdir() if p.suffix != ".onnx"]
    return w, write_artifact(folder, "unet.onnx", "onnx", inputs=[TensorSpec("x", "float32", [8, 64])],
                             outputs=[TensorSpec("y", "float32", [8, 32])], extra_files=data)


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "int8"])
def test_shared_weights_keep_prepacking_only_for_int8_graphs(tmp_path, quantize):
    """Mapped float weights are read in place (prepacking off); an int8 graph's session prepacks its weights."""
    folder = tmp_path / "artifact"
    w, entry = _matmul_artifact(folder, quantize)
    graph = load_backend("onnxruntime").open(folder, entry)
    options = graph.native.get_session_options()
    if quantize:
        with pytest.raises(RuntimeError, match="disable_prepacking"):
            options.get_session_config_entry("session.disable_prepacking")
        assert graph.prefetch_memory() == 0  # the session reads its packed copies, not the mapping
    else:
        assert options.get_session_config_entry("session.disable_prepacking") == "1"
        assert graph.prefetch_memory() == w.nbytes  # the MatMul reads the mapped weight on every run
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    y, ref = graph(x=x)["y"], x @ w
    if quantize:  # int8 weights and activations: measured 1.1% RMS
        assert np.sqrt(np.mean((y - ref) ** 2)) < 0.02 * np.sqrt(np.mean(ref ** 2))
    else:
        np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("pack_exclusive", [False, True], ids=["mapped", "pack_exclusive"])
@pytest.mark.parametrize("exclusive", [False, True], ids=["shareable", "exclusive"])
def test_pack_exclusive_graphs_load_and_pack_their_own_weights(tmp_path, pack_exclusive, exclusive):
    """With pack_exclusive, a float graph opened exclusive (one bucket resident) loads and prepacks its own weights;
    otherwise it reads the shared mapping in place."""
    folder = tmp_path / "artifact"
    w, entry = _matmul_artifact(folder, quantize=False)
    backend = load_backend("onnxruntime", pack_exclusive=pack_exclusive)
    graph = backend.open(folder, entry, exclusive=exclusive)
    shared = not (exclusive and pack_exclusive)
    assert backend.shares(exclusive) == shared
    options = graph.native.get_session_options()
    if shared:
        assert options.get_session_config_entry("session.disable_prepacking") == "1"
        assert graph.prefetch_memory() == w.nbytes
    else:
        with pytest.raises(RuntimeError, match="disable_prepacking"):
            options.get_session_config_entry("session.disable_prepacking")
        assert graph.prefetch_memory() == 0 and graph.release_memory() == 0  # nothing mapped
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    np.testing.assert_allclose(graph(x=x)["y"], x @ w, atol=1e-4, rtol=1e-5)
