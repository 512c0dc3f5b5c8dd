"""The ONNX post-pass rewrites: the exported erf-GELU becomes the standard Erf form that ONNX Runtime fuses."""

import math

import numpy as np
import onnxruntime as ort

from framegraph.runtime.manifest import Manifest


def _export(ms, cell, x, path):
    import onnx

    ms.export(cell, ms.Tensor(x), file_name=str(path)[:-5], file_format="ONNX")
    return onnx.load(str(path))


def _run(model, x, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, optimized=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if optimized:
        options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_gelu_subgraph_becomes_erf_and_onnxruntime_fuses_it(ms, tmp_path):
    import onnx
    from mindspore import nn

    from framegraph.export.onnx_fusions import fuse_gelu
    from framegraph.models.layers import gelu

    class GegluLike(nn.Cell):  # a GELU next to other uses of its input, as in GEGLU
        def construct(self, x):
            return x * gelu(x) + gelu(x * 2.0)

    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32) * 3
    model = _export(ms, GegluLike(), x, tmp_path / "g.onnx")
    before = _run(model, x)
    assert fuse_gelu(model) == 2
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Erf") == 2 and "Abs" not in ops and "Exp" not in ops
    onnx.checker.check_model(model)
    after = _run(model, x)
    erf = np.vectorize(math.erf)
    x64 = x.astype(np.float64)
    exact = x64 * 0.5 * (1 + erf(x64 / math.sqrt(2))) * x64 + 2 * x64 * 0.5 * (1 + erf(2 * x64 / math.sqrt(2)))
    np.testing.assert_allclose(after, exact, rtol=0, atol=2e-5)
    np.testing.assert_allclose(after, before, rtol=0, atol=2e-5)
    optimized = tmp_path / "optimized.onnx"
    np.testing.assert_allclose(_run(model, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized), after,
                               rtol=0, atol=1e-5)
    assert "Gelu" in {n.op_type for n in onnx.load(str(optimized)).graph.node}


def test_a_float16_gelu_exports_and_fuses_in_float16(ms, tmp_path):
    """The erf approximation's 1 / (1 + p|x|) is written with a float16 numerator (a Python float was exported as a
    float32 constant that made the Div, and all after it, float32: ONNX Runtime refused the graph), and the Erf
    form's constants take the input's type."""
    import onnx
    from mindspore import nn

    from framegraph.export.onnx_fusions import fuse_gelu
    from framegraph.models.layers import gelu

    class Gelu(nn.Cell):
        def construct(self, x):
            return gelu(x)

    x = (np.random.default_rng(0).standard_normal((4, 64)) * 3).astype(np.float16)
    model = _export(ms, Gelu(), x, tmp_path / "g16.onnx")
    before = _run(model, x)
    assert fuse_gelu(model) == 1
    onnx.checker.check_model(model, full_check=True)
    after = _run(model, x)
    assert before.dtype == after.dtype == np.float16
    x64 = x.astype(np.float64)
    exact = x64 * 0.5 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
    for out in (before, after):
        np.testing.assert_allclose(out.astype(np.float64), exact, rtol=2e-3, atol=2e-3)


def test_exported_unet_uses_erf_gelu(svd_artifact):
    import onnx

    m = Manifest.load(svd_artifact)
    entry = m.find("unet", "onnx", num_frames=2, batch=2)
    ops = [n.op_type for n in onnx.load(str(svd_artifact / entry.main_file), load_external_data=False).graph.node]
    assert ops.count("Erf") > 0 and "Abs" not in ops


def test_group_and_layer_norms_become_layer_normalization(ms, tmp_path):
    import onnx
    from mindspore import nn

    from framegraph.export.onnx_fusions import fuse_normalization
    from framegraph.models.layers import GroupNorm, LayerNorm

    class Norms(nn.Cell):  # a GroupNorm, then a LayerNorm over the last axis, as in a transformer block
        def __init__(self):
            super().__init__()
            self.group = GroupNorm(4, 16, eps=1e-6)
            self.layer = LayerNorm(8, eps=1e-5)

        def construct(self, x):
            y = self.group(x)
            return self.layer(y.reshape(2, 16, 8)) + y.reshape(2, 16, 8)

    x = np.random.default_rng(0).standard_normal((2, 16, 2, 4)).astype(np.float32) * 3 + 1
    model = _export(ms, Norms(), x, tmp_path / "n.onnx")
    before = _run(model, x)
    fused, count = fuse_normalization(model, tmp_path)
    assert count == 2
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("LayerNormalization") == 2 and "ReduceMean" not in ops and "Sqrt" not in ops
    onnx.checker.check_model(fused)
    np.testing.assert_allclose(_run(fused, x), before, rtol=0, atol=1e-5)
    # a graph with nothing to fuse comes back as it was
    again, none = fuse_normalization(fused, tmp_path)
    assert none == 0 and again is fused


def test_exported_graphs_use_layer_normalization(svd_artifact):
    import onnx

    m = Manifest.load(svd_artifact)
    for entry in m.graphs:
        if entry.format != "onnx":
            continue
        ops = [n.op_type for n in onnx.load(str(svd_artifact / entry.main_file), load_external_data=False).graph.node]
        assert "LayerNormalization" in ops and "Sqrt" not in ops, entry.key


def test_drop_unused_keeps_what_outputs_nodes_and_subgraphs_read():
    from onnx import TensorProto, helper, numpy_helper

    from framegraph.export.onnx_fusions import drop_unused

    def const(name):
        return numpy_helper.from_array(np.ones(2, np.float32), name)

    branch = helper.make_graph([helper.make_node("Add", ["x", "in_branch"], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["c"])], "other", [],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Mul", ["x", "scale"], ["y"]),
             helper.make_node("If", ["flag"], ["z"], then_branch=branch, else_branch=other),
             # a dead chain: a Constant read only by a Slice whose output nothing reads
             helper.make_node("Constant", [], ["starts"], value=numpy_helper.from_array(np.zeros(1, np.int64))),
             helper.make_node("Slice", ["x", "starts", "ends"], ["sliced"]),
             helper.make_node("Constant", [], ["orphan"], value=numpy_helper.from_array(np.zeros(1, np.int64)))]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("passed_out", TensorProto.FLOAT, [2])],
        [const("scale"), const("in_branch"), const("passed_out"), const("left_behind"),
         numpy_helper.from_array(np.ones(1, np.int64), "ends")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert drop_unused(model.graph) == (3, 2)  # Slice, then its Constant, and the orphan; "left_behind", "ends"
    assert [n.op_type for n in model.graph.node] == ["Mul", "If"]
    assert [t.name for t in model.graph.initializer] == ["scale", "in_branch", "passed_out"]
    assert drop_unused(model.graph) == (0, 0)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"x": np.full(2, 3.0, np.float32), "flag": np.array(True)})
    np.testing.assert_array_equal(outputs[1], np.full(2, 4.0, np.float32))
