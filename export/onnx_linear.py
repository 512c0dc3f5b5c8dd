"""Linear layers and layer norms as MindSpore exports them, folded into fewer ONNX nodes.

MindSpore writes a Dense layer as ``Reshape -> Gemm(x, W) -> Add(bias) -> Reshape`` and the affine part of a
LayerNorm as a ``Mul`` and an ``Add`` after the normalisation. ONNX Runtime fuses neither on CPU, so each is one
more pass over the activations. ``fold_linear`` rewrites, on the graph as exported (weights still graph inputs):

- ``Gemm(x, W) -> Add(b)`` into ``Gemm(x, W, b)``;
- ``LayerNormalization(x, ones) -> Mul(gamma) [-> Add(beta)]`` into ``LayerNormalization(x, gamma[, beta])`` when
  gamma (and beta) have exactly the normalized shape (not GroupNorm's per-channel affine, which follows a reshape);
- the GEGLU projection ``Gemm(x, W) -> Add(b) -> Reshape -> Slice[:N], Slice[N:]`` into two Gemms, one per half
  of W's rows: ONNX Runtime otherwise writes the (tokens, 2N) product and then copies both halves out of it.

The split weights are stored in their halves only: the rewrite returns a layout per new weight, which
``parameters_to_initializers`` applies when it writes the weights.
"""

import logging

import numpy as np

from framegraph.export.onnx_fusions import (NORM_SCALE_PREFIX, attributes, constant_values, graph_maps, name_nodes,
                                            replace_nodes, static_shapes)

logger = logging.getLogger(__name__)


class Rows:
    """Layout of a weight derived from rows ``start:stop`` of parameter ``source``."""

    def __init__(self, source, start, stop):
        self.source, self.start, self.stop = source, start, stop

    def __call__(self, array):
        return np.ascontiguousarray(np.asarray(array)[self.start:self.stop])


def _plain_gemm(node):
    """A Gemm computing x @ W^T or x @ W with no C input, unit alpha and beta."""
    if node.op_type != "Gemm" or len(node.input) != 2:
        return False
    attrs = attributes(node)
    return not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0


def _sole(consumers, name, op_type, outputs):
    users = consumers.get(name, [])
    if name in outputs or len(users) != 1 or users[0].op_type != op_type:
        return None
    return users[0]


def _other(node, name):
    """The input of binary ``node`` that is not ``name`` (None when both are)."""
    rest = [i for i in node.input if i != name]
    return rest[0] if len(rest) == 1 else None


class _Graph:
    """What the matchers read: shapes, consumers, small constants, the graph's outputs and weights."""

    def __init__(self, model, weights, base_dir):
        graph = model.graph
        self.shapes = static_shapes(model)
        self.shapes.update({t.name: list(t.dims) for t in graph.initializer})
        _, self.consumers = graph_maps(graph)
        self.constants = constant_values(graph, base_dir)
        self.outputs = {o.name for o in graph.output}
        self.weights = set(weights) | {t.name for t in graph.initializer}

    def vector(self, name, size):
        """True when ``name`` is a weight of shape (size,) or (1, size)."""
        return name in self.weights and self.shapes.get(name) in ([size], [1, size])

    def exclusive(self, name):
        return name in self.weights and len(self.consumers.get(name, [])) == 1


def _match_bias(gemm, g):
    """The Add to fold into ``gemm`` as its bias, or None."""
    out_shape = g.shapes.get(gemm.output[0])
    add = _sole(g.consumers, gemm.output[0], "Add", g.outputs)
    if out_shape is None or len(out_shape) != 2 or add is None:
        return None
    bias = _other(add, gemm.output[0])
    return add if bias is not None and g.vector(bias, out_shape[1]) else None


def _slice_bounds(node, g, rank, size):
    """(start, stop) of a step-1 Slice of the last axis of a ``rank``-D tensor whose last dim is ``size``."""
    values = [g.constants.get(name) for name in node.input[1:]]
    if len(values) < 2 or any(v is None or v.size != 1 for v in values):
        return None
    starts, ends = int(values[0].reshape(())), int(values[1].reshape(()))
    axis = int(values[2].reshape(())) if len(values) > 2 else 0
    step = int(values[3].reshape(())) if len(values) > 3 else 1
    if axis % rank != rank - 1 or step != 1:
        return None
    start, stop = (v + size if v < 0 else v for v in (starts, ends))
    return max(0, min(start, size)), max(0, min(stop, size))


def _match_geglu(gemm, add, g):
    """(reshape, [(slice, start, stop), ...]) when the biased ``gemm`` only feeds two slices that split its
    output columns in two halves through one Reshape, and its weight and bias are its own; else None."""
    reshape = _sole(g.consumers, add.output[0], "Reshape", g.outputs)
    if reshape is None or reshape.input[1] not in g.constants:
        return None
    if not attributes(gemm).get("transB", 0):  # MindSpore's Dense weights are (out, in); others are left alone
        return None
    weight, bias = gemm.input[1], _other(add, gemm.output[0])
    shape = g.shapes.get(reshape.output[0])
    n2 = g.shapes[gemm.output[0]][1]
    if shape is None or shape[-1] != n2 or n2 % 2 or not (g.exclusive(weight) and g.exclusive(bias)):
        return None
    slices = g.consumers.get(reshape.output[0], [])
    if reshape.output[0] in g.outputs or len(slices) != 2 or any(s.op_type != "Slice" for s in slices):
        return None
    bounds = [_slice_bounds(s, g, len(shape), n2) for s in slices]
    if None in bounds or sorted(bounds) != [(0, n2 // 2), (n2 // 2, n2)]:
        return None
    return reshape, [(s, *b) for s, b in zip(slices, bounds)]


def _split_gemm(gemm, add, reshape, parts, g, declare, constants):
    """Nodes computing each slice of ``parts`` with its own Gemm over its rows of the (out, in) weight; returns
    (nodes, layouts)."""
    from onnx import helper

    weight, bias = gemm.input[1], _other(add, gemm.output[0])
    weight_shape, shape = g.shapes[weight], g.shapes[reshape.output[0]]
    nodes, layouts = [], {}
    for node, start, stop in parts:
        w_name, b_name = f"{weight}[{start}:{stop}]", f"{bias}[{start}:{stop}]"
        layouts[w_name], layouts[b_name] = Rows(weight, start, stop), Rows(bias, start, stop)
        declare(w_name, [stop - start] + weight_shape[1:])
        declare(b_name, [stop - start])
        half = constants(f"{node.name}_shape", np.array(shape[:-1] + [stop - start], np.int64))
        nodes.append(helper.make_node("Gemm", [gemm.input[0], w_name, b_name], [f"{node.name}_gemm"],
                                      name=f"{node.name}_gemm", transB=1))
        nodes.append(helper.make_node("Reshape", [f"{node.name}_gemm", half], [node.output[0]],
                                      name=f"{node.name}_reshape"))
    return nodes, layouts


def fold_linear(model, weight_names, base_dir=None):
    """Rewrite (in place) the exported Dense and LayerNorm patterns of ``model`` (see the module docstring);
    ``weight_names``: the graph inputs that are parameters (the caller turns them into initializers);
    ``base_dir``: where external constants are.

    Returns ``{new weight name: Rows}`` for the weights the GEGLU split derives from parameters; the parameters
    it replaces are no longer graph inputs."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    name_nodes(graph)
    g = _Graph(model, weight_names, base_dir)
    counts = {"bias": 0, "norm": 0, "split": 0}
    replacement, layouts = {}, {}  # node name -> nodes in its place

    def declare(name, dims):
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))

    def constants(name, array):
        graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    for node in list(graph.node):
        if _plain_gemm(node):
            add = _match_bias(node, g)
            if add is None:
                continue
            geglu = _match_geglu(node, add, g)
            if geglu is not None:
                reshape, parts = geglu
                nodes, new_layouts = _split_gemm(node, add, reshape, parts, g, declare, constants)
                layouts.update(new_layouts)
                for n in [add, reshape] + [s for s, _, _ in parts]:
                    replacement[n.name] = []
                replacement[node.name] = nodes
                counts["split"] += 1
                continue
            node.input.append(_other(add, node.output[0]))
            node.output[0] = add.output[0]
            replacement[add.name] = []
            counts["bias"] += 1
        elif node.op_type == "LayerNormalization" and len(node.input) == 2:
            normalized = g.shapes.get(node.input[1])
            mul = _sole(g.consumers, node.output[0], "Mul", g.outputs)
            gamma = _other(mul, node.output[0]) if mul is not None else None
            if gamma is None or gamma not in g.weights or g.shapes.get(gamma) != normalized:
                continue
            node.input[1] = gamma
            node.output[0] = mul.output[0]
            replacement[mul.name] = []
            add = _sole(g.consumers, mul.output[0], "Add", g.outputs)
            beta = _other(add, mul.output[0]) if add is not None else None
            if beta is not None and beta in g.weights and g.shapes.get(beta) == normalized:
                node.input.append(beta)
                node.output[0] = add.output[0]
                replacement[add.name] = []
            counts["norm"] += 1
    if not replacement:
        return {}
    replace_nodes(graph, replacement, key=lambda node: node.name)
    used = {name for node in graph.node for name in node.input}
    dropped = [t for t in graph.initializer if t.name.startswith(NORM_SCALE_PREFIX) and t.name not in used]
    for tensor in dropped:
        graph.initializer.remove(tensor)
    split_away = {r.source for r in layouts.values()}
    inputs = [v for v in graph.input if v.name not in split_away]
    del graph.input[:]
    graph.input.extend(inputs)
    logger.info("folded %d biases into Gemms and %d norm affines into LayerNormalization; split %d GEGLU "
                "projections", counts["bias"], counts["norm"], counts["split"])
    return layouts
