"""Convolutions over tiny maps rewritten as patch GEMMs: same outputs, same weight size, only where it pays."""

import numpy as np
import onnxruntime as ort
import pytest

from framegraph.export.onnx_small_conv import convs_to_matmul


def _conv_graph(x_shape, w_shape, **attrs):
    """A Conv whose weight and bias are graph inputs (as the exporter writes parameters)."""
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w_shape)),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, [w_shape[0]])]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs),
             helper.make_node("Relu", ["y"], ["out"], name="relu")]
    kernel, pads = attrs["kernel_shape"], attrs.get("pads", [0, 0, 0, 0])
    strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
    out_shape = [x_shape[0], w_shape[0]] + [
        (x_shape[2 + i] + pads[i] + pads[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        for i in range(2)]
    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph(nodes, "g", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _run(model, arrays, x):
    """Run ``model`` with ``arrays`` (name -> value) moved from graph inputs into initializers."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for name, array in arrays.items():
        graph.initializer.append(numpy_helper.from_array(array, name))
    inputs = [v for v in graph.input if v.name not in arrays]
    del graph.input[:]
    graph.input.extend(inputs)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


CASES = {
    "3x3 on a 2x2 map": ((2, 8, 2, 2), (6, 8, 3, 3), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    "3x3 stride 2, 4x4 -> 2x2": ((2, 8, 4, 4), (6, 8, 3, 3),
                                 {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    "uneven pads": ((1, 5, 3, 4), (7, 5, 3, 3), {"kernel_shape": [3, 3], "pads": [1, 0, 0, 1]}),
    "1x1": ((3, 8, 2, 2), (4, 8, 1, 1), {"kernel_shape": [1, 1]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_small_map_conv_becomes_patch_gemm_with_equal_outputs(case):
    x_shape, w_shape, attrs = CASES[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    model = _conv_graph(x_shape, w_shape, **attrs)
    expected = _run(model, {"w": w, "b": b}, x)
    layouts = convs_to_matmul(model, ["w", "b"])
    assert set(layouts) == {"w"}
    ops = [n.op_type for n in model.graph.node]
    assert "Conv" not in ops and "Reshape" in ops and ops.count("MatMul") == 1
    stored = layouts["w"](w)
    assert stored.size == w.size and stored.flags["C_CONTIGUOUS"]
    declared = [d.dim_value for v in model.graph.input if v.name == "w" for d in v.type.tensor_type.shape.dim]
    assert declared == list(stored.shape)
    np.testing.assert_allclose(_run(model, {"w": stored, "b": b}, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, w_shape, attrs, why", [
    ((1, 4, 8, 8), (4, 4, 3, 3), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, "64 output positions"),
    ((1, 4, 2, 2), (4, 2, 3, 3), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": 2}, "grouped"),
    ((1, 4, 4, 4), (4, 4, 3, 3), {"kernel_shape": [3, 3], "dilations": [2, 2], "pads": [2, 2, 2, 2]}, "dilated"),
    ((2, 4, 4, 4), (4, 4, 3, 1), {"kernel_shape": [3, 1], "pads": [1, 0, 1, 0]}, "temporal (3, 1) kernel"),
])
def test_convs_it_does_not_pay_for_or_cannot_express_are_kept(x_shape, w_shape, attrs, why):
    model = _conv_graph(x_shape, w_shape, **attrs)
    assert convs_to_matmul(model, ["w", "b"]) == {}, why
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu"]


def test_weight_shared_with_another_node_is_left_alone():
    from onnx import helper

    model = _conv_graph((1, 4, 2, 2), (4, 4, 3, 3), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model.graph.node.append(helper.make_node("Identity", ["w"], ["w_copy"], name="other_use"))
    assert convs_to_matmul(model, ["w", "b"]) == {}


def test_exported_cell_stores_only_the_patch_layout_and_matches_mindspore(ms, tmp_path):
    """Through the exporter: MindSpore's Conv2d over small maps (padded, strided, 1x1 'valid') become patch GEMMs,
    the temporal convolution and a convolution over a larger map stay Convs, the weights file holds each weight
    once, and ONNX Runtime gives MindSpore's numbers."""
    import onnx
    from mindspore import nn

    from framegraph.export.onnx_graph import SharedWeights, export_onnx
    from framegraph.models.layers import Conv2d, TemporalConv3d

    class SmallMaps(nn.Cell):
        def __init__(self):
            super().__init__()
            self.down = Conv2d(8, 8, 3, stride=2, padding=1)  # 4x4 -> 2x2
            self.conv = Conv2d(8, 6, 3, padding=1)  # 2x2
            self.shortcut = Conv2d(8, 6, 1)  # 1x1, exported with auto_pad VALID
            self.temporal = TemporalConv3d(6, 6)  # (3, 1) over [B, C, F, H*W]: stays a Conv
            self.large = Conv2d(8, 8, 3, padding=1)  # 8x8 output: stays a Conv

        def construct(self, x, big):
            y = self.down(x)
            y = self.conv(y) + self.shortcut(y)
            y = self.temporal(y.reshape(1, 6, 2, 2, 2))
            return y, self.large(big)

    rng = np.random.default_rng(0)
    cell = SmallMaps()
    inputs = [rng.standard_normal((2, 8, 4, 4)).astype(np.float32),
              rng.standard_normal((1, 8, 8, 8)).astype(np.float32)]
    expected = [t.asnumpy() for t in cell(*[ms.Tensor(a) for a in inputs])]
    weights = SharedWeights(tmp_path / "weights.bin")
    path = export_onnx(cell, [ms.Tensor(a) for a in inputs], tmp_path / "small.onnx", ["x", "big"], ["y", "z"],
                       weights)
    model = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 2 and sum(n.name.endswith("_matmul") for n in model.graph.node) == 3
    parameter_bytes = sum(p.asnumpy().nbytes for p in cell.get_parameters())
    stored = sum(length for _, length in weights.index.values())
    assert stored == parameter_bytes  # every weight once, in one layout
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for ours, theirs in zip(session.run(["y", "z"], {"x": inputs[0], "big": inputs[1]}), expected):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
