"""Attention as one ONNX Runtime kernel, rewritten into a graph at load.

The export writes scaled dot-product attention (``models/layers.attention``) as standard ONNX:

    q [b, lq, h*d] -Reshape [b, lq, h, d]- -Transpose (0, 2, 1, 3)- -Mul (scale)- q'
    k [b, lk, h*d] -Reshape [b, lk, h, d]- -Transpose (0, 2, 3, 1)- k'
    v [b, lk, h*d] -Reshape [b, lk, h, d]- -Transpose (0, 2, 1, 3)- v'
    q' -MatMul k'- -Softmax (last axis)- -MatMul v'- -Transpose (0, 2, 1, 3)- out [b, lq, h, d]

(in a float16 graph the Softmax sits between a Cast to float32 and a Cast back: the kernel's softmax accumulates
in float32 as well)

where q' may be cut into query slices (``Slice`` on axis 2, each slice through its own MatMul-Softmax-MatMul, joined
by one ``Concat`` on axis 2, in order) so that no score tensor passes ``--attention-slice-mb``. The rule: every such
chain whose intermediate tensors feed nothing outside it is replaced by one ``com.microsoft.MultiHeadAttention``
(q, k, v; ``num_heads`` h, ``scale`` the Mul's constant; its [b, lq, h*d] output is ``out``'s data, which the
graph only reshapes next): the same products and softmax over every key, computed by
ONNX Runtime's kernel in blocks, so the scores are never held whole or per slice. Anything else is left as it is.
The artifact keeps the standard form (OpenVINO and MindSpore Lite read it); only ONNX Runtime's session gets the
fused one. Figures are in docs/performance.md.
"""

import logging

logger = logging.getLogger(__name__)

Q_PERM = [0, 2, 1, 3]
K_PERM = [0, 2, 3, 1]


class _Graph:
    """Producer, consumers and constant values of an ONNX graph's tensors."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {v.name for v in graph.output}
        self.constants = {t.name: t for t in graph.initializer if t.data_location != t.EXTERNAL}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t
        self._to_array = numpy_helper.to_array

    def value(self, name):
        """The constant ``name`` as a numpy array (also through a Cast of a constant), or None if it is not a
        constant held in the graph."""
        from onnx import helper

        tensor = self.constants.get(name)
        if tensor is not None:
            return self._to_array(tensor)
        cast = self.node(name, "Cast")
        if cast is not None:
            source = self.value(cast.input[0])
            return None if source is None else source.astype(helper.tensor_dtype_to_np_dtype(_attribute(cast, "to")))
        add = self.node(name, "Add")  # the export writes a slice's ends as starts + sizes
        terms = None if add is None else [self.value(term) for term in add.input]
        return None if terms is None or any(t is None for t in terms) else terms[0] + terms[1]

    def node(self, name, op_type):
        """The node of ``op_type`` producing ``name``, or None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_use(self, name, node):
        """Whether ``name`` feeds ``node`` alone and is not a graph output."""
        return name not in self.outputs and [id(n) for n in self.consumers.get(name, [])] == [id(node)]

    def uses_within(self, name, nodes):
        """Whether ``name`` feeds only ``nodes`` and is not a graph output."""
        ids = {id(n) for n in nodes}
        return name not in self.outputs and all(id(n) in ids for n in self.consumers.get(name, []))


def _attribute(node, name):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _transposed_heads(g, name, perm):
    """(the [b, l, h*d] tensor, h, d, the Reshape and Transpose nodes) where ``name`` is that tensor reshaped to
    [b, l, h, d] and transposed by ``perm``; else None."""
    transpose = g.node(name, "Transpose")
    if transpose is None or list(_attribute(transpose, "perm") or []) != perm:
        return None
    reshape = g.node(transpose.input[0], "Reshape")
    if reshape is None or not g.only_use(reshape.output[0], transpose):
        return None
    shape = g.value(reshape.input[1])
    if shape is None or shape.ndim != 1 or len(shape) != 4 or not all(shape > 0):
        return None
    return reshape.input[0], int(shape[2]), int(shape[3]), [reshape, transpose], [int(n) for n in shape]


def _slices(g, slices, dims):
    """Whether the Slice nodes ``slices``, in order, cut axis 2 of a tensor of shape ``dims`` into consecutive
    parts from 0 to its end, keeping the other axes whole (with one axis given, or all four)."""
    position = 0
    for node in slices:
        starts, ends = g.value(node.input[1]), g.value(node.input[2])
        axes = g.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        steps = g.value(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None):
            return False
        if steps is not None and not (steps == 1).all():
            return False
        axes = list(range(len(dims))) if axes is None else [int(a) % len(dims) for a in axes.reshape(-1)]
        starts, ends = [int(v) for v in starts.reshape(-1)], [int(v) for v in ends.reshape(-1)]
        if 2 not in axes or not len(axes) == len(starts) == len(ends):
            return False
        for axis, start, end in zip(axes, starts, ends):
            if axis != 2 and not (start == 0 and end >= dims[axis]):
                return False
        start, end = starts[axes.index(2)], ends[axes.index(2)]
        if start != position:
            return False
        position = min(end, dims[2])
    return position == dims[2]


def _single_cast(g, name):
    """The Cast that alone reads ``name`` (not a graph output), or None."""
    users = g.consumers.get(name, [])
    if len(users) == 1 and users[0].op_type == "Cast" and g.only_use(name, users[0]):
        return users[0]
    return None


def _match(g, mul):
    """The fused node and the nodes it replaces, for the attention whose scaled queries ``mul`` computes; else
    None."""
    import numpy as np
    from onnx import helper, numpy_helper

    scale = None
    for i in (0, 1):
        value = g.value(mul.input[1 - i])
        q = _transposed_heads(g, mul.input[i], Q_PERM) if value is not None and value.size == 1 else None
        if q is not None:
            scale, (q3, heads, dim, q_nodes, q_shape) = float(value.reshape(-1)[0]), q
            break
    if scale is None or not g.only_use(mul.input[i], mul) or mul.output[0] in g.outputs:
        return None
    users = g.consumers.get(mul.output[0], [])
    sliced = bool(users) and all(n.op_type == "Slice" and n.input[0] == mul.output[0] for n in users)
    if not sliced and not (len(users) == 1 and users[0].op_type == "MatMul" and users[0].input[0] == mul.output[0]):
        return None
    nodes, branch_outputs, key, value = q_nodes + [mul] + (users if sliced else []), [], None, None
    for first in users:
        product = g.consumers.get(first.output[0], []) if sliced else [first]
        if len(product) != 1 or product[0].op_type != "MatMul" or (sliced and not g.only_use(first.output[0],
                                                                                             product[0])):
            return None
        product = product[0]
        widen = _single_cast(g, product.output[0])  # a float16 graph's softmax runs in float32 between two Casts
        scores = product.output[0] if widen is None else widen.output[0]
        softmax = g.consumers.get(scores, [])
        if len(softmax) != 1 or softmax[0].op_type != "Softmax" or _attribute(softmax[0], "axis") not in (-1, 3):
            return None
        softmax = softmax[0]
        narrow = _single_cast(g, softmax.output[0]) if widen is not None else None
        if (widen is None) != (narrow is None):
            return None
        probabilities = softmax.output[0] if narrow is None else narrow.output[0]
        weighted = g.consumers.get(probabilities, [])
        if (not g.only_use(scores, softmax) or len(weighted) != 1 or weighted[0].op_type != "MatMul"
                or weighted[0].input[0] != probabilities or not g.only_use(probabilities, weighted[0])):
            return None
        weighted = weighted[0]
        if key not in (None, product.input[1]) or value not in (None, weighted.input[1]):
            return None
        key, value = product.input[1], weighted.input[1]
        nodes += [product, softmax, weighted] + ([widen, narrow] if widen is not None else [])
        branch_outputs.append(weighted.output[0])
    k = _transposed_heads(g, key, K_PERM)
    v = _transposed_heads(g, value, Q_PERM)
    if k is None or v is None or k[1:3] != (heads, dim) or v[1] != heads or k[4][0] != q_shape[0] or k[4][:2] != v[4][:2]:
        return None
    if not (g.uses_within(key, nodes) and g.uses_within(value, nodes)):
        return None
    nodes += k[3] + v[3]
    joined = branch_outputs[0]
    if sliced:
        concat = [n for n in g.consumers.get(branch_outputs[0], []) if n.op_type == "Concat"]
        if len(concat) != 1 or list(concat[0].input) != branch_outputs or _attribute(concat[0], "axis") not in (2, -2):
            return None
        if not all(g.only_use(name, concat[0]) for name in branch_outputs):
            return None
        if not _slices(g, users, [q_shape[0], q_shape[2], q_shape[1], q_shape[3]]):
            return None
        nodes.append(concat[0])
        joined = concat[0].output[0]
    transpose = g.consumers.get(joined, [])
    if len(transpose) != 1 or transpose[0].op_type != "Transpose" or list(_attribute(transpose[0], "perm") or []) \
            != Q_PERM or not g.only_use(joined, transpose[0]):
        return None
    readers = g.consumers.get(transpose[0].output[0], [])
    if transpose[0].output[0] in g.outputs or not readers or any(
            n.op_type != "Reshape" or n.input[0] != transpose[0].output[0] for n in readers):
        return None
    nodes.append(transpose[0])
    # the Reshape after the Transpose stays: it reads the same row-major data from MultiHeadAttention's
    # [b, lq, h*d] output as from the transposed [b, lq, h, d] one
    # MultiHeadAttention takes [b, l, h*d] inputs; the exported ones may be [b*l, h*d] (after a Gemm)
    name = f"{transpose[0].name or mul.name}_attention"
    inputs, fused, constants = [], [], []
    for role, source, shape in (("query", q3, q_shape), ("key", k[0], k[4]), ("value", v[0], v[4])):
        target = [shape[0], shape[1], shape[2] * shape[3]]
        constants.append(numpy_helper.from_array(np.array(target, np.int64), f"{name}_{role}_shape"))
        fused.append(helper.make_node("Reshape", [source, constants[-1].name], [f"{name}_{role}"],
                                      name=f"{name}_{role}"))
        inputs.append(fused[-1].output[0])
    fused.append(helper.make_node("MultiHeadAttention", inputs, [f"{name}_out"], domain="com.microsoft", name=name,
                                  num_heads=heads, scale=scale))
    return fused, constants, nodes, transpose[0].output[0]


def fuse_attention(model):
    """Replace each attention chain of ``model`` (an onnx ModelProto, changed in place) that matches the rule above
    by one MultiHeadAttention node; returns how many were replaced."""
    from onnx import helper

    graph = model.graph
    g = _Graph(graph)
    replaced, placed, renamed = set(), {}, {}
    for node in list(graph.node):
        if node.op_type != "Mul" or id(node) in replaced:
            continue
        match = _match(g, node)
        if match is None or any(id(n) in replaced for n in match[2]):
            continue
        fused, constants, nodes, output = match
        replaced.update(id(n) for n in nodes)
        placed[id(nodes[-1])] = fused  # where the chain's last node was: its inputs are computed before it
        renamed[output] = fused[-1].output[0]
        graph.initializer.extend(constants)
    if not placed:
        return 0
    kept = [new for n in graph.node for new in (placed[id(n)] if id(n) in placed else [n] if id(n) not in replaced
                                                else [])]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    used = {name for n in kept for name in n.input} | {v.name for v in graph.output}
    kept = [n for n in kept if n.op_type != "Constant" or any(name in used for name in n.output)]
    del graph.node[:]
    graph.node.extend(kept)
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    produced = {name for n in graph.node for name in n.output}
    for info in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(info)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(placed)


def fused_model(path):
    """(the serialized graph at ``path`` with its attention fused, the names of its initializers), or None where
    nothing matched or the onnx package is not installed. External weights stay in their files; the ones only the
    replaced nodes read (shape constants) are no longer initializers."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    count = fuse_attention(model)
    if not count:
        return None
    logger.info("%s: %d attention chains run as ONNX Runtime's MultiHeadAttention", path.name, count)
    return model.SerializeToString(), {t.name for t in model.graph.initializer}
