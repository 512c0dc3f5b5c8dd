"""Cutting chain-shaped ONNX graphs into parts run one after another (runtime/backends/onnx_parts.py), and the
ONNX Runtime backend running a streamed graph part by part, each part's weight pages given back before the next."""

import numpy as np
import pytest

from framegraph.runtime.backends import load_backend
from framegraph.runtime.backends.onnx_parts import cut_points, plan_cuts, split_model
from framegraph.runtime.manifest import GraphEntry, Manifest, TensorSpec, file_entry

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SIZE = 256  # each layer's weight: 256 x 256 float32, 256 KiB


def _weights(layers):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((SIZE, SIZE)) / np.sqrt(SIZE)).astype(np.float32) for _ in range(layers)]


def _chain(weights, skip=False, bias=False):
    """x -> (MatMul w_i, Relu, + residual) per layer; with ``skip``, the input is also added to the last layer's
    output, so no cut can leave one tensor alive; with ``bias``, every layer adds a bias computed at the start from
    constants alone (as a text encoder's causal mask is)."""
    nodes, h = [], "x"
    constants = []
    if bias:
        constants = [numpy_helper.from_array(np.full((SIZE,), 0.25, np.float32), "quarter")]
        nodes.append(helper.make_node("Mul", ["quarter", "quarter"], ["bias"]))
    for i in range(len(weights)):
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        if bias:
            nodes.append(helper.make_node("Add", [f"r{i}", "bias"], [f"b{i}"]))
        nodes.append(helper.make_node("Add", [f"b{i}" if bias else f"r{i}", h], [f"h{i}"]))
        h = f"h{i}"
    if skip:
        nodes.append(helper.make_node("Add", [h, "x"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, SIZE])],
                              initializer=[numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
                              + constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return onnx.shape_inference.infer_shapes(model)


def _reference(x, weights, skip=False, bias=False):
    h = x
    for w in weights:
        h = np.maximum(h @ w, 0) + np.float32(0.0625 if bias else 0) + h
    return h + x if skip else h


def _save(model, folder):
    """The model with its weights in folder/weights.bin (external data), reloaded without them."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "chain.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    return onnx.load(str(folder / "chain.onnx"), load_external_data=False)


def test_cut_points_are_where_one_tensor_is_alive(tmp_path):
    model = _save(_chain(_weights(3)), tmp_path)
    cuts = cut_points(model.graph)
    # after each layer's Add (its output is all that is needed next), and after the first layers' MatMul/Relu the
    # residual input is still alive with them, so those are not cuts
    names = [name for _, name, _ in cuts]
    assert names == ["h0", "h1", "h2"]
    read = [bytes_read for _, _, bytes_read in cuts]
    assert read == [SIZE * SIZE * 4 * k for k in (1, 2, 3)]


def test_a_skip_connection_around_everything_leaves_no_cut(tmp_path):
    model = _save(_chain(_weights(3), skip=True), tmp_path)
    assert cut_points(model.graph) == []
    assert plan_cuts(model.graph, SIZE * SIZE * 4) == []


def test_plan_cuts_balances_the_weights_and_keeps_small_graphs_whole(tmp_path):
    model = _save(_chain(_weights(4)), tmp_path)
    layer = SIZE * SIZE * 4
    assert plan_cuts(model.graph, 4 * layer) == []  # fits in one part
    assert [name for _, name, _ in plan_cuts(model.graph, 2 * layer)] == ["h1"]
    assert [name for _, name, _ in plan_cuts(model.graph, layer)] == ["h0", "h1", "h2"]
    assert plan_cuts(model.graph, 0) == []


def test_split_parts_compute_what_the_whole_graph_computes(tmp_path):
    weights = _weights(4)
    model = _save(_chain(weights), tmp_path)
    parts = split_model(model, plan_cuts(model.graph, SIZE * SIZE * 4 * 2))
    assert len(parts) == 2
    assert [len(p.graph.initializer) for p in parts] == [2, 2]
    assert [i.name for i in parts[1].graph.input] == ["h1"] and [o.name for o in parts[0].graph.output] == ["h1"]
    x = np.random.default_rng(1).standard_normal((4, SIZE)).astype(np.float32)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path))
    h = x
    for part in parts:
        session = ort.InferenceSession(part.SerializeToString(), options, providers=["CPUExecutionProvider"])
        h = session.run(None, {session.get_inputs()[0].name: h})[0]
    whole = ort.InferenceSession(str(tmp_path / "chain.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(h, whole.run(None, {"x": x})[0])
    np.testing.assert_allclose(h, _reference(x, weights), rtol=1e-4, atol=1e-4)


def test_tensors_computed_from_constants_do_not_block_cuts_and_are_recomputed_where_needed(tmp_path):
    weights = _weights(3)
    model = _save(_chain(weights, bias=True), tmp_path)
    cuts = plan_cuts(model.graph, SIZE * SIZE * 4)
    assert [name for _, name, _ in cuts] == ["h0", "h1"]
    parts = split_model(model, cuts)
    for part in parts:  # each part computes the bias itself
        assert [n.op_type for n in part.graph.node].count("Mul") == 1
        assert "quarter" in {t.name for t in part.graph.initializer}
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path))
    x = np.random.default_rng(1).standard_normal((4, SIZE)).astype(np.float32)
    h = x
    for part in parts:
        session = ort.InferenceSession(part.SerializeToString(), options, providers=["CPUExecutionProvider"])
        h = session.run(None, {session.get_inputs()[0].name: h})[0]
    np.testing.assert_allclose(h, _reference(x, weights, bias=True), rtol=1e-4, atol=1e-4)


def test_a_cut_tensor_without_a_recorded_type_keeps_the_graph_whole(tmp_path):
    model = _save(_chain(_weights(2)), tmp_path)
    del model.graph.value_info[:]
    cuts = plan_cuts(model.graph, SIZE * SIZE * 4)
    assert cuts and split_model(model, cuts) is None


def _chain_artifact(folder, layers=3):
    weights = _weights(layers)
    _save(_chain(weights), folder)
    entry = GraphEntry(name="image_encoder", format="onnx", bucket={"batch": 1},
                       files=[file_entry(folder, "chain.onnx"), file_entry(folder, "weights.bin")],
                       inputs=[TensorSpec("x", "float32", [4, SIZE])], outputs=[TensorSpec("y", "float32", [4, SIZE])])
    Manifest(pipeline="test", source={}, toolchain={}, constants={}, scheduler={}, defaults={},
             graphs=[entry]).save(folder)
    return weights, Manifest.load(folder).find("image_encoder", "onnx", batch=1)


def _resident_bytes(path):
    import psutil

    return sum(m.rss for m in psutil.Process().memory_maps(grouped=True) if m.path == str(path))


def test_a_streamed_graph_runs_in_parts_and_gives_each_parts_pages_back_before_the_next(tmp_path):
    weights, entry = _chain_artifact(tmp_path)
    layer = SIZE * SIZE * 4
    backend = load_backend("onnxruntime", stream_part_gb=layer / 1e9)
    graph = backend.open(tmp_path, entry, streamed=True)
    assert isinstance(graph.native, list) and len(graph.native) == 3
    weights_file = (tmp_path / "weights.bin").resolve()
    seen = []
    for session in graph.native:  # record what of the file is resident as each part starts
        def run(*args, _run=session.run):
            seen.append(_resident_bytes(weights_file))
            options = args[2]  # the arena gives back its chunks at the end of the run
            assert options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
            return _run(*args)
        session.run = run
    x = np.random.default_rng(2).standard_normal((4, SIZE)).astype(np.float32)
    for _ in range(2):
        seen.clear()
        np.testing.assert_allclose(graph(x=x)["y"], _reference(x, weights), rtol=1e-4, atol=1e-4)
        assert len(seen) == 3
        assert max(seen) <= 8192  # the parts before gave their pages back (at most two partial pages stay)
        assert _resident_bytes(weights_file) <= 8192  # and so did the last one
    assert graph.prefetch_memory() == 0  # nothing is kept resident to prefetch


def test_graphs_not_streamed_run_whole_and_keep_their_pages(tmp_path):
    """Not streamed (the UNet): one session, and the pages its run read stay. Streamed with stream_part_gb=0: one
    session, and the pages leave after the run."""
    weights, entry = _chain_artifact(tmp_path)
    layer = SIZE * SIZE * 4
    weights_file = (tmp_path / "weights.bin").resolve()
    x = np.random.default_rng(2).standard_normal((4, SIZE)).astype(np.float32)
    for backend, streamed in [(load_backend("onnxruntime", stream_part_gb=layer / 1e9), False),
                              (load_backend("onnxruntime", stream_part_gb=0), True)]:
        graph = backend.open(tmp_path, entry, streamed=streamed)
        assert not isinstance(graph.native, list)
        np.testing.assert_allclose(graph(x=x)["y"], _reference(x, weights), rtol=1e-4, atol=1e-4)
        if streamed:
            assert _resident_bytes(weights_file) <= 8192
            assert graph.prefetch_memory() == 0
        else:
            assert _resident_bytes(weights_file) >= 3 * layer - 8192
            assert graph.prefetch_memory() == 3 * layer
        graph.release_memory()
    with pytest.raises(ValueError, match="stream_part_gb"):
        load_backend("onnxruntime", stream_part_gb=-1)


def test_run_with_shrink_asks_the_arena_to_give_back_its_memory(tmp_path):
    """Graph.run(feeds, shrink=True) (the denoising loop's last UNet run) passes ONNX Runtime the arena-shrinkage
    run option; a plain call of a graph that is not streamed passes none."""
    weights, entry = _chain_artifact(tmp_path)
    graph = load_backend("onnxruntime").open(tmp_path, entry)
    seen = []

    def run(*args, _run=graph.native.run):
        seen.append(args[2] if len(args) > 2 else None)
        return _run(*args)

    graph.native.run = run
    x = np.random.default_rng(3).standard_normal((4, SIZE)).astype(np.float32)
    plain = graph(x=x)["y"]
    shrunk = graph.run({"x": x}, shrink=True)["y"]
    np.testing.assert_array_equal(plain, shrunk)
    assert seen[0] is None
    assert seen[1].get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
