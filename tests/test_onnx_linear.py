"""Dense biases, LayerNorm affines and GEGLU projections folded by ``fold_linear``: same outputs, fewer nodes."""

import numpy as np
import onnxruntime as ort
import pytest

from framegraph.export.onnx_linear import fold_linear


def _model(nodes, inputs, output_shape, constants=None):
    """A graph whose weights are graph inputs (as the exporter writes parameters); ``constants``: small int64
    initializers (shapes, slice bounds)."""
    from onnx import TensorProto, helper, numpy_helper

    value_infos = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)) for name, shape in inputs]
    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, list(output_shape))
    initializers = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in (constants or {}).items()]
    graph = helper.make_graph(nodes, "g", value_infos, [output], initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _run(model, weights, x, layouts=None):
    """Run ``model`` with every graph input but ``x`` made an initializer, laid out by ``layouts`` (as
    ``parameters_to_initializers`` stores them)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inputs = []
    for value in graph.input:
        if value.name == "x":
            inputs.append(value)
            continue
        layout = (layouts or {}).get(value.name)
        array = weights[getattr(layout, "source", value.name)]
        graph.initializer.append(numpy_helper.from_array(layout(array) if layout else array, value.name))
    del graph.input[:]
    graph.input.extend(inputs)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _dense(w_shape=(5, 8)):
    from onnx import helper

    nodes = [helper.make_node("Reshape", ["x", "rows"], ["x2"], name="flat"),
             helper.make_node("Gemm", ["x2", "w"], ["y"], name="gemm", transB=1),
             helper.make_node("Add", ["y", "b"], ["yb"], name="bias"),
             helper.make_node("Reshape", ["yb", "back"], ["y3"], name="unflat"),
             helper.make_node("Relu", ["y3"], ["out"], name="relu")]
    inputs = [("x", (2, 3, 8)), ("w", w_shape), ("b", (w_shape[0],))]
    return _model(nodes, inputs, (2, 3, w_shape[0]), {"rows": [6, 8], "back": [2, 3, w_shape[0]]})


def _arrays(seed, **shapes):
    """Seeded random float32 arrays by name, drawn in order: the weights, then the graph input ``x``."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


def test_dense_bias_is_folded_into_the_gemm():
    model = _dense()
    weights = _arrays(0, w=(5, 8), b=(5,), x=(2, 3, 8))
    x = weights["x"]
    before = _run(model, weights, x)
    assert fold_linear(model, ["w", "b"]) == {}
    assert _ops(model) == ["Reshape", "Gemm", "Reshape", "Relu"]
    assert list(model.graph.node[1].input) == ["x2", "w", "b"]
    np.testing.assert_allclose(_run(model, weights, x), before, rtol=1e-6, atol=1e-6)


def _norm(axis, gamma_shape, beta=True):
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("LayerNormalization", ["x", "norm_ones_6"], ["n"], name="norm", axis=axis),
             helper.make_node("Mul", ["n", "gamma"], ["scaled"], name="scale")]
    inputs = [("x", (2, 4, 6)), ("gamma", gamma_shape)]
    last = "scaled"
    if beta:
        nodes.append(helper.make_node("Add", ["beta", "scaled"], ["shifted"], name="shift"))
        inputs.append(("beta", gamma_shape))
        last = "shifted"
    nodes.append(helper.make_node("Relu", [last], ["out"], name="relu"))
    model = _model(nodes, inputs, (2, 4, 6))
    ones_shape = (4, 6) if axis == 1 else (6,)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(ones_shape, np.float32), "norm_ones_6"))
    return model


@pytest.mark.parametrize("beta", [True, False], ids=["scale and shift", "scale only"])
def test_layer_norm_affine_moves_into_the_norm(beta):
    model = _norm(-1, (6,), beta)
    weights = _arrays(1, gamma=(6,), beta=(6,), x=(2, 4, 6))
    x = weights["x"]
    before = _run(model, weights, x)
    fold_linear(model, ["gamma", "beta"] if beta else ["gamma"])
    assert _ops(model) == ["LayerNormalization", "Relu"]
    assert list(model.graph.node[0].input) == (["x", "gamma", "beta"] if beta else ["x", "gamma"])
    assert not any(t.name == "norm_ones_6" for t in model.graph.initializer), "the unused unit scale stays behind"
    np.testing.assert_allclose(_run(model, weights, x), before, rtol=1e-5, atol=1e-5)


def test_affine_over_part_of_the_normalized_shape_is_kept():
    """Normalised over (4, 6) with a scale over the last axis only: not a LayerNormalization scale."""
    model = _norm(1, (6,))
    fold_linear(model, ["gamma", "beta"])
    assert _ops(model) == ["LayerNormalization", "Mul", "Add", "Relu"]


def _geglu(shared_weight=False):
    from onnx import helper

    nodes = [helper.make_node("Reshape", ["x", "rows"], ["x2"], name="flat"),
             helper.make_node("Gemm", ["x2", "w"], ["y"], name="proj", transB=1),
             helper.make_node("Add", ["y", "b"], ["yb"], name="bias"),
             helper.make_node("Reshape", ["yb", "back"], ["y3"], name="unflat"),
             helper.make_node("Slice", ["y3", "zero", "half", "last"], ["hidden"], name="hidden"),
             helper.make_node("Slice", ["y3", "half", "big", "last"], ["gate"], name="gate"),
             helper.make_node("Erf", ["gate"], ["act"], name="act"),
             helper.make_node("Mul", ["hidden", "act"], ["out"], name="glu")]
    if shared_weight:
        nodes.append(helper.make_node("Gemm", ["x2", "w"], ["other"], name="other", transB=1))
    constants = {"rows": [6, 8], "back": [2, 3, 10], "zero": [0], "half": [5], "big": [2 ** 62], "last": [-1]}
    return _model(nodes, [("x", (2, 3, 8)), ("w", (10, 8)), ("b", (10,))], (2, 3, 5), constants)


def test_geglu_projection_becomes_two_gemms_over_the_weight_halves():
    model = _geglu()
    weights = _arrays(2, w=(10, 8), b=(10,), x=(2, 3, 8))
    x = weights["x"]
    before = _run(model, weights, x)
    layouts = fold_linear(model, ["w", "b"])
    assert sorted(layouts) == ["b[0:5]", "b[5:10]", "w[0:5]", "w[5:10]"]
    assert "Slice" not in _ops(model) and _ops(model).count("Gemm") == 2
    assert {v.name for v in model.graph.input} == {"x"} | set(layouts), "the unsplit weights are still inputs"
    np.testing.assert_array_equal(layouts["w[5:10]"](weights["w"]), weights["w"][5:])
    np.testing.assert_allclose(_run(model, weights, x, layouts), before, rtol=1e-6, atol=1e-6)


def test_geglu_weight_used_elsewhere_is_not_split():
    model = _geglu(shared_weight=True)
    assert fold_linear(model, ["w", "b"]) == {}
    assert _ops(model).count("Slice") == 2 and "Add" not in _ops(model), "the bias should still be folded"
