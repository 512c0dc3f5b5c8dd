"""Opt-in int8 weights for CPU (``svd-export --quantize int8``): ONNX Runtime's dynamic quantization of the UNet.

Weights are stored as int8 and activations are quantized at run time, per tensor, by ``DynamicQuantizeLinear``
(standard ONNX ops: ``MatMulInteger``, ``ConvInteger``). What was measured on this machine's AVX2 CPU (no VNNI)
decided the details:

- the exporter writes linear layers as ``Gemm``, which the dynamic quantizer skips: they become MatMul + Add first;
- MatMul weights are signed int8 (ONNX Runtime's u8s8 GEMM ran 2.1x the fp32 GEMM), convolution weights unsigned
  (its ``ConvInteger`` ran 1.3x fp32 with uint8 weights but 0.3x with int8 ones);
- only the spatial transformer blocks' linear layers are quantized (attention projections and feed-forward): on
  the tiny text-to-video UNet, the temporal layers and the transformers' proj_in/proj_out were the most sensitive
  to per-tensor activation quantization (one of them alone moved the output by up to 9% RMS, the median layer by
  0.2%); attention's activation-by-activation products stay fp32.
"""

import logging
import re
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8",)
QUANTIZED_GRAPHS = ("unet",)
# Linear layers left in float (matched against the weight's checkpoint name).
FLOAT_LINEAR = re.compile(r"temp|transformer_in|proj_in|proj_out|time_|add_embedding|class_embedding")


def quantizable_matmuls(model):
    """Names of the MatMul nodes with a constant weight that is not in FLOAT_LINEAR."""
    initializers = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1
            and n.input[1] in initializers and not FLOAT_LINEAR.search(n.input[1])]


def gemm_to_matmul(model):
    """Rewrite every ``Gemm`` with a constant B (alpha = beta = 1, no transA) as MatMul (+ Add); returns the count.

    Needs the initializers' data loaded (``onnx.load`` with external data)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    users = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    new_nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        constant_b = len(node.input) > 1 and node.input[1] in initializers
        if (node.op_type != "Gemm" or not constant_b or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(node)
            continue
        b_name = node.input[1]
        weight = numpy_helper.to_array(initializers[b_name])
        if attrs.get("transB", 0):
            weight = weight.T
        kn_name = f"{b_name}_kn"
        if kn_name not in initializers:
            tensor = numpy_helper.from_array(weight.copy(), kn_name)
            graph.initializer.append(tensor)
            initializers[kn_name] = tensor
        users[b_name] -= 1
        out = node.output[0]
        if len(node.input) > 2 and node.input[2]:
            product = f"{out}_matmul"
            new_nodes.append(helper.make_node("MatMul", [node.input[0], kn_name], [product], name=f"{node.name}_mm"))
            new_nodes.append(helper.make_node("Add", [product, node.input[2]], [out], name=f"{node.name}_bias"))
        else:
            new_nodes.append(helper.make_node("MatMul", [node.input[0], kn_name], [out], name=f"{node.name}_mm"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    return rewritten


def fold_weight_reshapes(model):
    """Replace ``Reshape(initializer, constant shape)`` by the reshaped initializer (the temporal convolutions'
    weights are reshaped in the graph, and the quantizer needs a convolution's weight to be an initializer)."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def value(name):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        if name in constants:
            return numpy_helper.to_array(constants[name].attribute[0].t)
        return None

    kept, folded = [], 0
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[0] in initializers:
            shape = value(node.input[1])
            if shape is not None:
                array = value(node.input[0]).reshape([int(d) for d in shape])
                graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
                folded += 1
                continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph)
    return folded


def drop_unused_domains(model):
    """Remove opset imports of domains no node uses (the quantizer declares com.microsoft even when it writes only
    standard ops)."""
    used = {n.domain or "" for n in model.graph.node}
    kept = [o for o in model.opset_import if (o.domain or "") in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _drop_unused_initializers(graph):
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def quantize_int8(source, target):
    """Quantize the ONNX graph ``source`` (external data next to it) into ``target`` (external data in
    ``target``'s folder)."""
    source, target = Path(source), Path(target)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs a line per tensor on the root logger
    try:
        selected, linear = _quantize(source, target)
    finally:
        root.setLevel(level)
    logger.info("quantized %s to int8 weights: %d linear layers (of %d) and the convolutions", target.name,
                selected, linear)
    return target


def _quantize(source, target):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="framegraph-quantize-", dir=target.parent) as tmp:
        model = onnx.load(str(source))
        count = gemm_to_matmul(model)
        fold_weight_reshapes(model)
        selected = quantizable_matmuls(model)
        matmul = Path(tmp) / "matmul.onnx"
        onnx.save(model, str(matmul), save_as_external_data=True, location="matmul.data")
        del model
        linear = Path(tmp) / "linear_int8.onnx"
        quantize_dynamic(str(matmul), str(linear), op_types_to_quantize=["MatMul"], nodes_to_quantize=selected,
                         weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
        quantize_dynamic(str(linear), str(target), op_types_to_quantize=["Conv"], weight_type=QuantType.QUInt8,
                         use_external_data_format=True)
    return len(selected), count
