"""Convolutions over tiny feature maps rewritten as one matrix product over their patches.

At the UNet's lowest levels the feature maps are 2x2 or 4x4 (3x3 convolutions over 1280 channels). ONNX Runtime's
convolution kernels parallelise over output rows and channel blocks and reach a fraction of the GEMM speed on such
shapes. ``convs_to_matmul`` gathers the patches instead (NHWC transpose, pad, one strided slice per kernel tap,
concat) and multiplies them by the weight laid out as (taps x channels, out_channels): the weights keep their size,
the product is one well-shaped GEMM.

The rewrite works on the graph as exported, while the weights are still graph inputs, and returns how each weight
must be laid out; ``parameters_to_initializers`` applies that when it writes the weights, so the artifact only ever
stores the new layout.
"""

import logging

import numpy as np

from framegraph.export.onnx_fusions import attributes, graph_maps, name_nodes, replace_nodes, static_shapes

logger = logging.getLogger(__name__)

MAX_OUTPUT_POSITIONS = 16  # output height x width up to which the patch GEMM beat the Conv kernel (see README)


def _weight_parameter(name, consumers, params):
    """True when the Conv weight ``name`` is a parameter that this Conv alone uses."""
    return name in params and len(consumers.get(name, [])) == 1


class _Weight:
    """Lays a Conv weight of shape (out, in, kh, kw) out as the patch GEMM's (kh * kw * in, out) matrix."""

    def __init__(self, out_channels, in_channels, kh, kw):
        self.shape = (out_channels, in_channels, kh, kw)

    def __call__(self, array):
        w = np.asarray(array).reshape(self.shape)
        out_channels, in_channels, kh, kw = self.shape
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(kh * kw * in_channels, out_channels))


def _patch_gemm_nodes(node, shape, out_shape, weight, attrs, constants):
    """Nodes computing ``node`` (a Conv) as patches @ weight; ``constants(name, array)`` adds an initializer."""
    from onnx import helper

    n, c, _, _ = shape
    _, o, ho, wo = out_shape
    kh, kw = attrs["kernel_shape"]
    sh, sw = attrs.get("strides", [1, 1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    name = node.name
    nodes = [helper.make_node("Transpose", [node.input[0]], [f"{name}_nhwc"], perm=[0, 2, 3, 1], name=f"{name}_nhwc")]
    source = f"{name}_nhwc"
    if top or left or bottom or right:
        pads = constants(f"{name}_pads", np.array([0, top, left, 0, 0, bottom, right, 0], np.int64))
        nodes.append(helper.make_node("Pad", [source, pads], [f"{name}_padded"], name=f"{name}_pad"))
        source = f"{name}_padded"
    if kh == kw == sh == sw == 1:  # a 1x1 convolution: the (padded) pixels are the patches
        patches = source
    else:
        axes = constants(f"{name}_axes", np.array([1, 2], np.int64))
        steps = constants(f"{name}_steps", np.array([sh, sw], np.int64))
        taps = []
        for i in range(kh):
            for j in range(kw):
                starts = constants(f"{name}_start{i}_{j}", np.array([i, j], np.int64))
                ends = constants(f"{name}_end{i}_{j}",
                                 np.array([i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1], np.int64))
                taps.append(f"{name}_tap{i}_{j}")
                nodes.append(helper.make_node("Slice", [source, starts, ends, axes, steps], [taps[-1]],
                                              name=taps[-1]))
        patches = f"{name}_patches"
        nodes.append(helper.make_node("Concat", taps, [patches], axis=3, name=patches))
    rows = constants(f"{name}_rows_shape", np.array([n, ho * wo, kh * kw * c], np.int64))
    nodes.append(helper.make_node("Reshape", [patches, rows], [f"{name}_rows"], name=f"{name}_rows"))
    product = f"{name}_product"
    nodes.append(helper.make_node("MatMul", [f"{name}_rows", weight], [product], name=f"{name}_matmul"))
    if len(node.input) > 2 and node.input[2]:
        nodes.append(helper.make_node("Add", [product, node.input[2]], [f"{name}_biased"], name=f"{name}_bias"))
        product = f"{name}_biased"
    grid = constants(f"{name}_grid_shape", np.array([n, ho, wo, o], np.int64))
    nodes.append(helper.make_node("Reshape", [product, grid], [f"{name}_grid"], name=f"{name}_grid"))
    nodes.append(helper.make_node("Transpose", [f"{name}_grid"], [node.output[0]], perm=[0, 3, 1, 2],
                                  name=f"{name}_nchw"))
    return nodes


def _rewritable(node, shapes, consumers, params, max_positions):
    """The attributes of Conv ``node`` when it can and should become a patch GEMM, else None."""
    attrs = attributes(node)
    shape, out_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
    if shape is None or out_shape is None or len(shape) != 4 or "kernel_shape" not in attrs:
        return None
    if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
        return None
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":  # MindSpore's unpadded convolutions
        attrs["pads"] = [0, 0, 0, 0]
    elif auto_pad != "NOTSET":
        return None
    if out_shape[2] * out_shape[3] > max_positions:
        return None
    kh, kw = attrs["kernel_shape"]
    if kh != kw:  # the temporal (3, 1) convolutions: no gain measured, and their map grows with the frame count
        return None
    if not _weight_parameter(node.input[1], consumers, params):
        return None
    return attrs


def convs_to_matmul(model, param_names, max_positions=MAX_OUTPUT_POSITIONS):
    """Rewrite (in place) every 2-D Conv of ``model`` whose output map has at most ``max_positions`` positions
    and whose weight is one of ``param_names`` (graph inputs the caller turns into initializers).

    Returns ``{parameter name: layout}``, where ``layout(array)`` gives the weight to store; the graph input's
    declared shape is updated to match."""
    from onnx import numpy_helper

    graph = model.graph
    if not any(node.op_type == "Conv" for node in graph.node):
        return {}
    params = {v.name: v for v in graph.input if v.name in set(param_names)}
    shapes = static_shapes(model)
    _, consumers = graph_maps(graph)
    name_nodes(graph)  # new node and constant names are derived from node names

    def constants(name, array):
        graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    layouts, replacement = {}, {}
    for node in graph.node:
        attrs = _rewritable(node, shapes, consumers, params, max_positions) if node.op_type == "Conv" else None
        if attrs is None:
            continue
        param = node.input[1]
        shape, out_shape = shapes[node.input[0]], shapes[node.output[0]]
        replacement[id(node)] = _patch_gemm_nodes(node, shape, out_shape, param, attrs, constants)
        kh, kw = attrs["kernel_shape"]
        layouts[param] = _Weight(out_shape[1], shape[1], kh, kw)
        dims = params[param].type.tensor_type.shape.dim
        del dims[:]
        for size in (kh * kw * shape[1], out_shape[1]):
            dims.add().dim_value = size
    if not layouts:
        return {}
    replace_nodes(graph, replacement)
    logger.info("rewrote %d convolutions over small maps as patch GEMMs", len(layouts))
    return layouts
