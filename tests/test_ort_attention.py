"""The ONNX Runtime backend runs the exported attention chains as one MultiHeadAttention kernel (ort_attention):
every chain of the exported UNet is fused, whole or in query slices, with the same numbers, and a chain whose
intermediate tensors are read elsewhere is left as it is."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from framegraph.runtime.backends.onnxruntime import OnnxRuntimeBackend
from framegraph.runtime.backends.ort_attention import fuse_attention
from framegraph.runtime.manifest import Manifest

B, L, HEADS, DIM = 2, 16, 2, 4


def attention_model(slice_queries=None, leak=False, float16=False):
    """q, k, v [B, L, HEADS*DIM] through the export's attention chain (``models/layers.attention``), with queries in
    slices of ``slice_queries``; ``leak`` also makes the first softmax a graph output; ``float16``: the chain of a
    float16 export (float16 tensors, the softmax in float32 between two Casts)."""
    c = HEADS * DIM
    dtype, elem = (np.float16, TensorProto.FLOAT16) if float16 else (np.float32, TensorProto.FLOAT)
    inits = [numpy_helper.from_array(np.array([B, L, HEADS, DIM], np.int64), "heads_shape"),
             numpy_helper.from_array(np.array([B * L, c], np.int64), "rows_shape"),
             numpy_helper.from_array(np.array(1 / math.sqrt(DIM), dtype), "scale")]
    nodes = [helper.make_node("Reshape", [n, "heads_shape"], [n + "4"]) for n in "qkv"]
    nodes += [helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
              helper.make_node("Mul", ["qt", "scale"], ["qs"]),
              helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3])]
    outputs = [helper.make_tensor_value_info("out", elem, [B * L, c])]
    starts = [0] if slice_queries is None else list(range(0, L, slice_queries))
    parts = []
    for i, start in enumerate(starts):
        query = "qs"
        if slice_queries is not None:
            inits += [numpy_helper.from_array(np.array([value], np.int64), f"{name}{i}")
                      for name, value in (("start", start), ("end", min(L, start + slice_queries)), ("axis", 2))]
            nodes.append(helper.make_node("Slice", ["qs", f"start{i}", f"end{i}", f"axis{i}"], [f"slice{i}"]))
            query = f"slice{i}"
        nodes.append(helper.make_node("MatMul", [query, "kt"], [f"scores{i}"]))
        if float16:
            nodes += [helper.make_node("Cast", [f"scores{i}"], [f"wide{i}"], to=TensorProto.FLOAT),
                      helper.make_node("Softmax", [f"wide{i}"], [f"wideprobs{i}"], axis=-1),
                      helper.make_node("Cast", [f"wideprobs{i}"], [f"probs{i}"], to=TensorProto.FLOAT16)]
        else:
            nodes.append(helper.make_node("Softmax", [f"scores{i}"], [f"probs{i}"], axis=-1))
        nodes.append(helper.make_node("MatMul", [f"probs{i}", "vt"], [f"part{i}"]))
        parts.append(f"part{i}")
    if leak:
        outputs.append(helper.make_tensor_value_info("probs0", elem, None))
    joined = "part0"
    if slice_queries is not None:
        nodes.append(helper.make_node("Concat", parts, ["joined"], axis=2))
        joined = "joined"
    nodes += [helper.make_node("Transpose", [joined], ["heads_out"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["heads_out", "rows_shape"], ["out"])]
    inputs = [helper.make_tensor_value_info(n, elem, [B, L, c]) for n in "qkv"]
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("slice_queries", [None, 5])
def test_the_attention_chain_becomes_one_kernel_with_the_same_numbers(slice_queries):
    model = attention_model(slice_queries)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((B, L, HEADS * DIM)).astype(np.float32) for n in "qkv"}
    expected = run(model, feeds)[0]
    assert fuse_attention(model) == 1
    assert [n.op_type for n in model.graph.node if n.op_type in ("Softmax", "MatMul", "Slice", "Concat")] == []
    assert sum(n.op_type == "MultiHeadAttention" for n in model.graph.node) == 1
    np.testing.assert_allclose(run(model, feeds)[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("slice_queries", [None, 5])
def test_a_float16_chain_with_its_softmax_between_casts_becomes_one_kernel(slice_queries):
    model = attention_model(slice_queries, float16=True)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((B, L, HEADS * DIM)).astype(np.float16) for n in "qkv"}
    expected = run(model, feeds)[0].astype(np.float32)
    assert fuse_attention(model) == 1
    assert [n.op_type for n in model.graph.node if n.op_type in ("Softmax", "Cast", "MatMul")] == []
    np.testing.assert_allclose(run(model, feeds)[0].astype(np.float32), expected, rtol=0, atol=2e-3)
    leaking = attention_model(leak=True, float16=True)
    assert fuse_attention(leaking) == 0


def test_a_chain_read_elsewhere_or_sliced_with_a_gap_is_left_alone():
    leaking = attention_model(leak=True)
    before = leaking.SerializeToString()
    assert fuse_attention(leaking) == 0 and leaking.SerializeToString() == before
    gap = attention_model(slice_queries=5)
    next(t for t in gap.graph.initializer if t.name == "start1").CopyFrom(
        numpy_helper.from_array(np.array([6], np.int64), "start1"))  # queries 5 skipped: not one attention
    assert fuse_attention(gap) == 0


def test_every_attention_of_the_exported_unet_is_fused_and_the_graph_gives_the_same_numbers(svd_artifact, caplog):
    manifest = Manifest.load(svd_artifact)
    entry = next(g for g in manifest.graphs if g.name == "unet" and g.format == "onnx" and g.bucket["batch"] == 2)
    model = onnx.load(str(svd_artifact / entry.main_file), load_external_data=False)
    softmax = sum(n.op_type == "Softmax" for n in model.graph.node)
    assert softmax > 0 and fuse_attention(model) == softmax  # spatial, temporal and cross attention alike
    rng = np.random.default_rng(0)
    feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in entry.inputs}
    caplog.set_level("INFO", logger="framegraph.runtime.backends.ort_attention")
    fused = OnnxRuntimeBackend().open(svd_artifact, entry)  # on by default
    assert f"{softmax} attention chains run as ONNX Runtime's MultiHeadAttention" in caplog.text
    caplog.clear()
    plain = OnnxRuntimeBackend(fuse_attention=False).open(svd_artifact, entry)
    assert "MultiHeadAttention" not in caplog.text
    for a, b in zip(fused.run(feeds).values(), plain.run(feeds).values()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
