"""Opt-in int8 weights for CPU (``svd-export --quantize int8``): ONNX Runtime's dynamic quantization of the UNet.

The UNet's linear layers get int8 weights, and their activations are quantized at run time, per tensor, by
``DynamicQuantizeLinear`` (standard ONNX ops: ``MatMulInteger``; ONNX Runtime fuses each into one
``DynamicQuantizeMatMul``). What was measured on SVD-XT's UNet (128x128, 4 frames, CFG) on this machine's AVX2 CPU
without VNNI decided the details:

- weights are signed and use 7 bits (``reduce_range``): without VNNI the u8 x s8 kernel adds pairs of products
  in saturating 16-bit lanes, and full-range weights overflowed them. With every linear layer quantized, the
  UNet's output moved by 15% RMS with 8-bit weights and by 1.9% with 7-bit ones, at the same speed;
- every linear layer is quantized except the timestep and conditioning embeddings (a few rows each, nothing to
  gain): with 7-bit weights the temporal layers and proj_in/proj_out no longer stand out. The UNet step took
  0.69x the fp32 step, against 0.79x when only the spatial transformers' layers were quantized;
- the exporter writes linear layers as ``Gemm``, which the dynamic quantizer skips: they become MatMul + Add first;
- convolutions stay float: ONNX Runtime's ``ConvInteger`` took 1.43 s per step against 1.3 s for the float
  convolutions; all of them as int8 patch GEMMs with 7-bit weights took 0.655x the fp32 step against 0.658x
  without, and raised the output's error from 1.9% to 3.3%. The exceptions are those the export already writes
  as patch GEMMs (the 2x2 and 4x4 maps, ``onnx_small_conv``): they are MatMuls, and quantized as such;
- attention's activation-by-activation products stay float.
"""

import logging
import re
import tempfile
from pathlib import Path

from framegraph.export.onnx_fusions import drop_unused

logger = logging.getLogger(__name__)

# the graphs --quantize applies to (its modes: options.QUANTIZE_MODES): the UNet and its step-caching graphs
QUANTIZED_GRAPHS = ("unet", "unet_deep", "unet_shallow")
# Linear layers left in float (matched against the weight's checkpoint name): the timestep, frame-position and
# conditioning embeddings, whose products have one row per sample.
FLOAT_LINEAR = re.compile(r"time_|add_embedding|class_embedding")


def constant_weight_matmuls(model):
    """The MatMul nodes whose second input is an initializer."""
    initializers = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in initializers]


def quantizable_matmuls(model):
    """Names of the MatMul nodes with a constant weight that is not in FLOAT_LINEAR."""
    return [n.name for n in constant_weight_matmuls(model) if not FLOAT_LINEAR.search(n.input[1])]


def gemm_to_matmul(model):
    """Rewrite every ``Gemm`` with a constant B (alpha = beta = 1, no transA) as MatMul (+ Add); returns the count.

    Needs the initializers' data loaded (``onnx.load`` with external data)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
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
    drop_unused(graph)
    return rewritten


def drop_unused_domains(model):
    """Remove opset imports of domains no node uses (the quantizer declares com.microsoft even when it writes only
    standard ops)."""
    used = {n.domain or "" for n in model.graph.node}
    kept = [o for o in model.opset_import if (o.domain or "") in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def quantize_int8(source, target):
    """Quantize the ONNX graph ``source`` (external data next to it) into ``target`` (external data in
    ``target``'s folder)."""
    source, target = Path(source), Path(target)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs a line per tensor on the root logger
    try:
        selected, products = _quantize(source, target)
    finally:
        root.setLevel(level)
    logger.info("quantized %s to int8 weights: %d of its %d products by a constant weight (the others are "
                "embeddings)", target.name, selected, products)
    return target


def _quantize(source, target):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="framegraph-quantize-", dir=target.parent) as tmp:
        model = onnx.load(str(source))
        gemm_to_matmul(model)
        selected = quantizable_matmuls(model)
        products = len(constant_weight_matmuls(model))
        matmul = Path(tmp) / "matmul.onnx"
        onnx.save(model, str(matmul), save_as_external_data=True, location="matmul.data")
        del model
        quantize_dynamic(str(matmul), str(target), op_types_to_quantize=["MatMul"], nodes_to_quantize=selected,
                         weight_type=QuantType.QInt8, reduce_range=True, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    return len(selected), products
