"""ONNX rewrites that make a graph compute the same in MindSpore Lite 2.0 as in ONNX Runtime.

Lite 2.0's ONNX converter and CPU kernels read some standard ONNX wrongly, most of them without an error (measured
against ONNX Runtime 1.32; tests/test_lite_native.py shows each case):

- ``Resize``, mode nearest (the ONNX default): Lite runs a Resize without ``mode`` as linear, honours
  ``nearest_mode`` only for some coordinate modes, and rounds non-integer output sizes up. Rule: a nearest Resize
  becomes one ``Gather`` per resized axis, with the source indices computed here by the ONNX formulas (the input
  shape must be static). A linear Resize keeps its node with ``mode`` and ``coordinate_transformation_mode`` written
  out (Lite's default coordinate mode differs from ONNX's); one whose scales give a non-integer size is refused.
- ``LayerNormalization``: wrong results (the epsilon ignored, NaN without an ``axis``), and no build without a bias.
  Rule: decomposed into ReduceMean, Sub, Mul, ReduceMean, Add(epsilon), Sqrt, Div, Mul(scale)[, Add(bias)].
- ``Cos``: off by up to 1.8e-3 for |x| >= 1 while Lite's ``Sin`` is exact. Rule: cos(x) = 1 - 2 sin(x/2)^2
  (exact to ~2e-7 at any |x|; sin(x + pi/2) loses the rounding of x + pi/2, 1.4e-5 at |x| = 1000).
- ``Conv`` without ``kernel_shape`` fails to convert ("kernel_size/stride/dilation is nullptr"). Rule: the defaults
  (kernel_shape from the weight, strides and dilations 1) are written out.
- A node whose inputs are all constants (the ``Slice`` of the position embedding in CLIP's text encoder) is left
  in the converted graph as a kernel that nothing triggers: Lite's actor runtime then waits forever in ``Predict``.
  Rule (:func:`fold_constant_nodes`, run first): every such node is computed here (ONNX's reference evaluator) and
  its outputs become initializers.

The rewrites keep the graph standard ONNX with the same inputs, outputs and weights, and ONNX Runtime computes the
rewritten graph as it computed the original. Only the main graph is rewritten (not If/Loop bodies). Initializers that
a rewrite reads (Resize scales and sizes, Conv weights' shapes) must be loaded (``onnx.load`` does that by default).
"""

import logging
import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_fusions import attributes, drop_unused

logger = logging.getLogger(__name__)

REWRITTEN = ("Resize", "LayerNormalization", "Cos", "Conv")
# initializers above this many bytes leave the copy that shape inference reads (they become typed inputs)
INFERENCE_INLINE_BYTES = 1 << 16


def make_lite_safe(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` rewritten for MindSpore Lite (``rewrite_for_lite``); ``model`` is left as it is."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    rewrite_for_lite(copy)
    return copy


def rewrite_for_lite(model: onnx.ModelProto, base_dir=None) -> dict:
    """Rewrite ``model``'s main graph in place (the module docstring lists the rules; ``base_dir`` holds the external
    data of folded constants); returns {op_type: count}."""
    folded = fold_constant_nodes(model, base_dir)
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)
    names = _Names(graph)
    shapes = None
    counts = {}
    nodes = []
    for node in graph.node:
        if node.op_type not in REWRITTEN:
            nodes.append(node)
            continue
        if shapes is None and node.op_type in ("Resize", "LayerNormalization"):
            shapes = static_shapes(model)
        attributes_before = len(node.attribute)
        if node.op_type == "Resize":
            replacement = _resize(node, graph, shapes, opset, names)
        elif node.op_type == "LayerNormalization":
            replacement = _decompose_layer_norm(node, shapes, opset, names)
        elif node.op_type == "Cos":
            replacement = _cos_as_sin(node, names)
        else:
            replacement = _explicit_conv(node, graph)
        nodes.extend(replacement)
        if replacement != [node] or len(node.attribute) != attributes_before:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if counts:
        del graph.node[:]
        graph.node.extend(nodes)
        drop_unused(graph)  # the scales and sizes of the Resize nodes that became Gathers
        logger.info("rewrote for MindSpore Lite: %s", ", ".join(f"{n} {op}" for op, n in sorted(counts.items())))
    if folded:
        counts["folded constants"] = folded
    return counts


def fold_constant_nodes(model: onnx.ModelProto, base_dir=None) -> int:
    """Replace every node of the main graph whose inputs are all initializers or Constant outputs (and that draws no
    random numbers) by initializers holding its outputs, computed with ``onnx.reference``; ``base_dir`` is where the
    external data of such inputs lives. Returns how many nodes were folded."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = {t.name: t for t in graph.initializer}
    opsets = list(model.opset_import)
    kept, folded = [], 0
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or node.op_type.startswith("Random") or node.domain not in ("", "ai.onnx") or (
                not inputs or not all(name in known for name in inputs)):
            kept.append(node)
            if node.op_type == "Constant":
                value = _constant_tensor(node)
                if value is not None:
                    known[node.output[0]] = value
            continue
        tensors = []
        for name in inputs:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(known[name])
            if uses_external_data(tensor):
                load_external_data_for_tensor(tensor, str(base_dir or "."))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
            tensor.name = name
            tensors.append(tensor)
        single = helper.make_model(
            helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in node.output],
                              tensors), opset_imports=opsets)
        for name, value in zip(node.output, ReferenceEvaluator(single).run(None, {})):
            tensor = numpy_helper.from_array(np.asarray(value), name)
            graph.initializer.append(tensor)
            known[name] = tensor
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        drop_unused(graph)
        logger.info("folded %d node(s) of constants for MindSpore Lite", folded)
    return folded


def _constant_tensor(node):
    """The tensor of a Constant node (its ``value`` attribute), or None for the other forms."""
    for attribute in node.attribute:
        if attribute.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attribute.t)
            tensor.name = node.output[0]
            return tensor
    return None


def static_shapes(model):
    """Tensor name -> list of dims (int, or None where unknown) from ONNX shape inference. Large initializers are
    passed as typed inputs, so a model of any size (or with its external data not loaded) can be inferred."""
    graph = model.graph
    light = onnx.GraphProto(name=graph.name)
    light.node.extend(graph.node)
    light.input.extend(graph.input)
    light.output.extend(graph.output)
    light.value_info.extend(graph.value_info)
    declared = {v.name for v in graph.input}
    for t in graph.initializer:
        if len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data) > INFERENCE_INLINE_BYTES or any(
                e.key == "location" for e in t.external_data):
            if t.name not in declared:
                light.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            light.initializer.append(t)
    inferred = onnx.shape_inference.infer_shapes(
        helper.make_model(light, opset_imports=model.opset_import, ir_version=model.ir_version))
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


class _Names:
    """Fresh tensor/node names that clash with none in the graph."""

    def __init__(self, graph):
        self.used = {name for node in graph.node for name in (*node.input, *node.output, node.name)}
        self.used.update(t.name for t in graph.initializer)
        self.used.update(v.name for v in (*graph.input, *graph.output))

    def __call__(self, base):
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _constant(names, base, value, dtype=np.float32):
    """A Constant node holding ``value``; returns (node, output name)."""
    out = names(base)
    tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), out)
    return helper.make_node("Constant", [], [out], name=names(f"{base}/node"), value=tensor), out


def _constant_value(graph, name):
    """The value of initializer or Constant output ``name`` as a numpy array; None where it is neither."""
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            attr = node.attribute[0]
            return numpy_helper.to_array(attr.t) if attr.name == "value" else np.asarray(
                helper.get_attribute_value(attr))
    return None


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


# -- Resize ------------------------------------------------------------------------------------------------------

def _resize(node, graph, shapes, opset, names):
    where = f"Resize {node.name or node.output[0]!r}"
    if opset < 11:
        raise ValueError(f"{where}: a Resize of opset {opset} (before 11) is not supported for MindSpore Lite; convert "
                         "the graph to opset 11 or later (onnx.version_converter)")
    attrs = {k: _text(v) for k, v in attributes(node).items()}
    mode = attrs.get("mode", "nearest")
    x = node.input[0]
    in_shape = shapes.get(x)
    scales = _constant_value(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = _constant_value(graph, node.input[3]) if len(node.input) > 3 and node.input[3] else None
    has_sizes, has_scales = sizes is not None and sizes.size > 0, scales is not None and scales.size > 0
    if in_shape is None or None in in_shape or not (has_sizes or has_scales):
        raise ValueError(f"{where}: MindSpore Lite needs a static input shape and constant scales or sizes here "
                         f"(input shape {in_shape}); export the graph with static shapes")
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise ValueError(f"{where}: keep_aspect_ratio_policy={attrs['keep_aspect_ratio_policy']!r} is not supported "
                         "for MindSpore Lite; resize with explicit sizes (policy 'stretch')")
    axes = [a % len(in_shape) for a in attrs.get("axes", range(len(in_shape)))]
    if has_sizes:
        out = {a: int(s) for a, s in zip(axes, sizes)}
        scale = {a: np.float32(out[a]) / np.float32(in_shape[a]) for a in axes}
    else:
        scale = {a: np.float32(s) for a, s in zip(axes, scales)}
        out = {a: int(math.floor(in_shape[a] * float(scale[a]))) for a in axes}
    if mode == "nearest":
        return _nearest_as_gather(node, attrs, in_shape, axes, out, scale, names, where)
    if not has_sizes and any(in_shape[a] * float(scale[a]) != out[a] for a in axes):
        raise ValueError(f"{where}: the scales {scales.tolist()} give non-integer sizes of {in_shape}, which "
                         "MindSpore Lite rounds up where ONNX rounds down; resize with a 'sizes' input or scales "
                         "that divide evenly")
    for key, default in (("mode", "nearest"), ("coordinate_transformation_mode", "half_pixel")):
        if key not in attrs:
            node.attribute.append(helper.make_attribute(key, default))
    if mode != "linear":
        logger.warning("%s: mode %r is not checked against MindSpore Lite; compare its outputs", where, mode)
    return [node]


def _source_coordinates(ctm, x, length_in, length_out, scale):
    """ONNX Resize's coordinate transformation (float32, as ONNX Runtime computes it)."""
    x = x.astype(np.float32)
    if ctm == "half_pixel":
        return (x + np.float32(0.5)) / scale - np.float32(0.5)
    if ctm == "pytorch_half_pixel":
        return (x + np.float32(0.5)) / scale - np.float32(0.5) if length_out > 1 else np.zeros_like(x)
    if ctm == "align_corners":
        return x * np.float32(length_in - 1) / np.float32(length_out - 1) if length_out > 1 else np.zeros_like(x)
    if ctm == "asymmetric":
        return x / scale
    if ctm == "tf_half_pixel_for_nn":
        return (x + np.float32(0.5)) / scale
    raise ValueError(f"coordinate_transformation_mode {ctm!r} is not supported for MindSpore Lite; use "
                     "half_pixel, pytorch_half_pixel, align_corners, asymmetric or tf_half_pixel_for_nn")


def _nearest_index(nearest_mode, x):
    if nearest_mode == "round_prefer_floor":
        return np.where(x == np.floor(x) + np.float32(0.5), np.floor(x), np.round(x))
    if nearest_mode == "round_prefer_ceil":
        return np.floor(x + np.float32(0.5))
    if nearest_mode == "floor":
        return np.floor(x)
    if nearest_mode == "ceil":
        return np.ceil(x)
    raise ValueError(f"nearest_mode {nearest_mode!r} is not an ONNX nearest_mode")


def _nearest_as_gather(node, attrs, in_shape, axes, out, scale, names, where):
    ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
    nearest_mode = attrs.get("nearest_mode", "round_prefer_floor")
    base = node.name or node.output[0]
    changed = [a for a in axes if out[a] != in_shape[a] or scale[a] != 1]
    if not changed:
        return [helper.make_node("Identity", [node.input[0]], [node.output[0]], name=names(f"{base}/identity"))]
    nodes, current = [], node.input[0]
    for i, a in enumerate(changed):
        source = _source_coordinates(ctm, np.arange(out[a]), in_shape[a], out[a], scale[a])
        index = np.clip(_nearest_index(nearest_mode, source), 0, in_shape[a] - 1).astype(np.int64)
        const, index_name = _constant(names, f"{base}/index_axis{a}", index, np.int64)
        result = node.output[0] if i == len(changed) - 1 else names(f"{base}/gather_axis{a}")
        nodes += [const, helper.make_node("Gather", [current, index_name], [result], name=names(f"{base}/gather{a}"),
                                          axis=a)]
        current = result
    logger.debug("%s: nearest (%s, %s) as Gather on axes %s", where, ctm, nearest_mode, changed)
    return nodes


# -- LayerNormalization ------------------------------------------------------------------------------------------

def _reduce_mean(x, out, axes, opset, names, base):
    """ReduceMean over ``axes`` keeping dims: axes as an attribute before opset 18, as an input from 18 on."""
    if opset < 18:
        return [helper.make_node("ReduceMean", [x], [out], name=names(f"{base}/node"), axes=axes, keepdims=1)]
    const, axes_name = _constant(names, f"{base}/axes", axes, np.int64)
    return [const, helper.make_node("ReduceMean", [x, axes_name], [out], name=names(f"{base}/node"), keepdims=1)]


def _decompose_layer_norm(node, shapes, opset, names):
    """y = (x - mean) / sqrt(mean((x - mean)^2) + epsilon) * scale + bias over axes [axis, rank); the optional Mean
    and InvStdDev outputs are computed too when the node has them."""
    attrs = attributes(node)
    axis = attrs.get("axis", -1)
    epsilon = attrs.get("epsilon", 1e-5)
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    base = node.name or node.output[0]
    if axis < 0:
        axes = list(range(axis, 0))
    elif x in shapes:
        axes = list(range(axis, len(shapes[x])))
    else:
        raise ValueError(
            f"LayerNormalization {node.name!r}: the rank of its input {x!r} is unknown, so axis={axis} cannot be "
            "turned into axes; give the graph static input shapes (or use a negative axis)")
    t = {k: names(f"{base}/{k}") for k in ("mean", "centered", "square", "var", "var_eps", "std", "normed", "scaled")}
    eps_node, eps = _constant(names, f"{base}/epsilon", epsilon)
    outputs = list(node.output) + [""] * (3 - len(node.output))
    y = outputs[0]
    nodes = _reduce_mean(x, t["mean"], axes, opset, names, f"{base}/reduce_mean")
    nodes += [helper.make_node("Sub", [x, t["mean"]], [t["centered"]], name=names(f"{base}/sub")),
              helper.make_node("Mul", [t["centered"], t["centered"]], [t["square"]], name=names(f"{base}/square"))]
    nodes += _reduce_mean(t["square"], t["var"], axes, opset, names, f"{base}/reduce_var")
    nodes += [eps_node,
              helper.make_node("Add", [t["var"], eps], [t["var_eps"]], name=names(f"{base}/add_epsilon")),
              helper.make_node("Sqrt", [t["var_eps"]], [t["std"]], name=names(f"{base}/sqrt")),
              helper.make_node("Div", [t["centered"], t["std"]], [t["normed"]], name=names(f"{base}/div")),
              helper.make_node("Mul", [t["normed"], scale], [t["scaled"] if bias else y], name=names(f"{base}/mul"))]
    if bias:
        nodes.append(helper.make_node("Add", [t["scaled"], bias], [y], name=names(f"{base}/add_bias")))
    if outputs[1]:
        nodes.append(helper.make_node("Identity", [t["mean"]], [outputs[1]], name=names(f"{base}/mean_out")))
    if outputs[2]:
        nodes.append(helper.make_node("Reciprocal", [t["std"]], [outputs[2]], name=names(f"{base}/inv_std")))
    return nodes


# -- Cos, Conv ---------------------------------------------------------------------------------------------------

def _cos_as_sin(node, names):
    """cos(x) = 1 - 2 sin(x/2)^2."""
    base = node.name or node.output[0]
    half_node, half = _constant(names, f"{base}/half", 0.5)
    two_node, two = _constant(names, f"{base}/two", 2.0)
    one_node, one = _constant(names, f"{base}/one", 1.0)
    t = {k: names(f"{base}/{k}") for k in ("half_x", "sin", "sin_sq", "twice")}
    return [half_node, two_node, one_node,
            helper.make_node("Mul", [node.input[0], half], [t["half_x"]], name=names(f"{base}/halve")),
            helper.make_node("Sin", [t["half_x"]], [t["sin"]], name=names(f"{base}/sin")),
            helper.make_node("Mul", [t["sin"], t["sin"]], [t["sin_sq"]], name=names(f"{base}/square")),
            helper.make_node("Mul", [t["sin_sq"], two], [t["twice"]], name=names(f"{base}/double")),
            helper.make_node("Sub", [one, t["twice"]], [node.output[0]], name=names(f"{base}/one_minus"))]


def _explicit_conv(node, graph):
    """The node, with kernel_shape, strides and dilations set where they were left to their defaults."""
    have = attributes(node)
    if "kernel_shape" not in have:
        weight = next((t for t in graph.initializer if t.name == node.input[1]), None)
        if weight is None:
            raise ValueError(
                f"Conv {node.name or node.output[0]!r} has no kernel_shape attribute and its weight {node.input[1]!r} "
                "is not an initializer; MindSpore Lite needs the kernel shape: export the Conv with kernel_shape set")
        have["kernel_shape"] = list(weight.dims[2:])
        node.attribute.append(helper.make_attribute("kernel_shape", have["kernel_shape"]))
    for key in ("strides", "dilations"):
        if key not in have:
            node.attribute.append(helper.make_attribute(key, [1] * len(have["kernel_shape"])))
    return [node]
