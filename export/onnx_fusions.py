"""Graph rewrites of the exported ONNX that keep it standard ONNX but let ONNX Runtime use fused kernels.

MindSpore cannot export ``Erf``, so the models compute the exact GELU from exp/mul/div (``models/layers.py``):
about twenty elementwise nodes per GELU. ``fuse_gelu`` puts back the textbook form
``0.5 * x * (1 + Erf(x / sqrt(2)))`` (standard since opset 9), which ONNX Runtime's optimizer turns into one Gelu
kernel. The export's numerical check runs on the rewritten graph.
"""

import logging
import math

logger = logging.getLogger(__name__)

GELU_OPS = {"Abs", "Mul", "Add", "Sub", "Div", "Neg", "Exp"}
GELU_MAX_NODES = 40


def graph_maps(graph):
    producer = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producer, consumers


INTEGER_ARITHMETIC = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b}


def fold_integer_constants(model):
    """Replace (in place) every Add, Sub or Mul of integer constants held in the graph by a Constant of its value;
    returns how many. The exporter writes a query slice's end as start + size, which shape inference does not
    evaluate: the shapes after a sliced attention stay unknown and the rewrites that need them pass it by."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    integer = {TensorProto.INT32, TensorProto.INT64}
    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer
              if t.data_location != t.EXTERNAL and t.data_type in integer}
    nodes, folded = [], 0
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            if node.attribute[0].t.data_type in integer:
                values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        terms = [values.get(name) for name in node.input]
        if node.op_type in INTEGER_ARITHMETIC and len(terms) == 2 and all(t is not None for t in terms):
            result = np.asarray(INTEGER_ARITHMETIC[node.op_type](*terms)).astype(np.result_type(*terms))
            values[node.output[0]] = result
            node = helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                    value=numpy_helper.from_array(result, node.output[0]))
            folded += 1
        nodes.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(nodes)
    return folded


def static_shapes(model):
    """Tensor name -> shape, for every tensor whose shape ONNX shape inference fully knows."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def tensor_types(model):
    """Tensor name -> ONNX element type (``TensorProto.FLOAT``, ``FLOAT16``, ...), for every tensor whose type ONNX
    shape inference knows, initializers included."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def name_nodes(graph):
    """Give every node a unique name (``OpType_index``) unless they all have one already."""
    names = [n.name for n in graph.node]
    if "" in names or len(set(names)) != len(names):
        for i, node in enumerate(graph.node):
            node.name = f"{node.op_type}_{i}"


def attributes(node):
    """A node's attributes as {name: Python value}."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def replace_nodes(graph, replacement, key=id):
    """Put ``replacement[key(node)]`` (a list of nodes, possibly empty) in place of each node it names, in order."""
    kept = []
    for node in graph.node:
        kept.extend(replacement.get(key(node), [node]))
    del graph.node[:]
    graph.node.extend(kept)


def _names_read(graph):
    """Every tensor name a node of ``graph`` (or of a subgraph of one) reads, and the graph's outputs."""
    from onnx import AttributeProto

    names = {value.name for value in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                names |= _names_read(sub)
    return names


def drop_unused(graph):
    """Remove from ``graph`` the nodes whose outputs nothing reads (repeatedly, as removing one can free its
    inputs' producers) and then the initializers no node reads: constants and slices that the rewrites left behind,
    or that the exporter wrote for nothing. ONNX Runtime logs a warning for each unused initializer (a Constant node
    is one to it) every time it builds a session. Returns (nodes removed, initializers removed)."""
    nodes_dropped = 0
    while True:
        read = _names_read(graph)
        live = [node for node in graph.node if any(name in read for name in node.output if name)]
        if len(live) == len(graph.node):
            break
        nodes_dropped += len(graph.node) - len(live)
        del graph.node[:]
        graph.node.extend(live)
    kept = [tensor for tensor in graph.initializer if tensor.name in read]
    initializers_dropped = len(graph.initializer) - len(kept)
    if initializers_dropped:
        del graph.initializer[:]
        graph.initializer.extend(kept)
    if nodes_dropped or initializers_dropped:
        logger.info("dropped %d nodes and %d initializers whose outputs nothing reads", nodes_dropped,
                    initializers_dropped)
    return nodes_dropped, initializers_dropped


def _descendants(start, consumers, limit):
    seen, front = {id(start): start}, [start]
    while front and len(seen) <= limit:
        node = front.pop(0)  # breadth first: the GELU's own nodes come before the rest of the graph
        for out in node.output:
            for nxt in consumers.get(out, []):
                if id(nxt) not in seen:
                    seen[id(nxt)] = nxt
                    front.append(nxt)
    return seen


def _ancestors_within(end, producer, allowed):
    region, front = {id(end): end}, [end]
    while front:
        node = front.pop()
        for name in node.input:
            prev = producer.get(name)
            if prev is not None and id(prev) in allowed and id(prev) not in region:
                region[id(prev)] = prev
                front.append(prev)
    return region


def _match_gelu(abs_node, producer, consumers, outputs):
    """The nodes of one exported GELU starting at ``abs_node`` and its final Add, or None."""
    x = abs_node.input[0]
    halves = [n for n in consumers.get(x, []) if n.op_type == "Mul"]
    below = _descendants(abs_node, consumers, 2 * GELU_MAX_NODES)
    for half in halves:
        for final in consumers.get(half.output[0], []):
            if final.op_type != "Add" or id(final) not in below:
                continue
            region = _ancestors_within(final, producer, below)
            region[id(half)] = half
            nodes = list(region.values())
            kinds = [n.op_type for n in nodes]
            if not set(kinds) <= GELU_OPS or kinds.count("Abs") != 1 or kinds.count("Exp") != 1:
                continue
            if len(nodes) > GELU_MAX_NODES or len(nodes) < 10:
                continue
            inner = {out for n in nodes if n is not final for out in n.output}
            leaks = [o for o in inner if o in outputs or any(id(c) not in region for c in consumers.get(o, []))]
            if leaks:
                continue
            return nodes, final
    return None


def fuse_gelu(model):
    """Replace every exported erf-GELU subgraph of ``model`` (in place) by Div/Erf/Add/Mul/Mul; returns the count.
    The new constants take the element type of the GELU's input (a float16 graph stays float16)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    producer, consumers = graph_maps(graph)
    outputs = {o.name for o in graph.output}
    constants = {"sqrt2": math.sqrt(2.0), "one": 1.0, "half": 0.5}
    matches, claimed = [], set()
    for node in graph.node:
        if node.op_type != "Abs":
            continue
        found = _match_gelu(node, producer, consumers, outputs)
        if found and not any(id(n) in claimed for n in found[0]):
            matches.append((node.input[0], found))
            claimed.update(id(n) for n in found[0])
    if not matches:
        return 0
    types = tensor_types(model)
    existing = {t.name for t in graph.initializer}

    def constant(key, elem_type):
        name = f"gelu_{key}" if elem_type == TensorProto.FLOAT else f"gelu_{key}_{TensorProto.DataType.Name(elem_type)}"
        if name not in existing:
            dtype = helper.tensor_dtype_to_np_dtype(elem_type)
            graph.initializer.append(numpy_helper.from_array(np.array(constants[key], dtype), name))
            existing.add(name)
        return name

    replacement = {}
    for i, (x, (nodes, final)) in enumerate(matches):
        p = f"gelu_{i}"
        elem_type = types.get(x, TensorProto.FLOAT)
        replacement[id(final)] = [
            helper.make_node("Div", [x, constant("sqrt2", elem_type)], [f"{p}_scaled"], name=f"{p}_div"),
            helper.make_node("Erf", [f"{p}_scaled"], [f"{p}_erf"], name=f"{p}_erf"),
            helper.make_node("Add", [f"{p}_erf", constant("one", elem_type)], [f"{p}_one_plus"], name=f"{p}_add"),
            helper.make_node("Mul", [x, f"{p}_one_plus"], [f"{p}_x_times"], name=f"{p}_mul"),
            helper.make_node("Mul", [f"{p}_x_times", constant("half", elem_type)], [final.output[0]],
                             name=f"{p}_half"),
        ]
        for n in nodes:
            if n is not final:
                replacement[id(n)] = []
    replace_nodes(graph, replacement)
    logger.info("fused %d GELU subgraphs into Erf form", len(matches))
    return len(matches)


# Normalisation: MindSpore writes GroupNorm and LayerNorm out as
#   m = ReduceMean(x); d = x - m; v = ReduceMean(d * d); y = d / Sqrt(v + eps)
# over the trailing axes of x (GroupNorm after reshaping to (N, groups, -1)). ``fuse_normalization`` replaces those
# seven nodes with one LayerNormalization (standard since opset 17) with unit scale and no bias; the affine part
# that follows stays as it is. ONNX Runtime runs LayerNormalization as one parallel kernel instead of seven passes.
LAYER_NORM_OPSET = 17
NORM_SCALE_PREFIX = "norm_ones_"


def upgrade_opset(model, version=LAYER_NORM_OPSET):
    """``model`` converted to ONNX opset ``version`` (no-op when it is already there); weights stay external."""
    from onnx import version_converter

    current = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= version:
        return model
    return version_converter.convert_version(model, version)


def constant_values(graph, base_dir):
    """Small constants by name: Constant nodes and initializers (external ones read from ``base_dir``)."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    values = {}
    for t in graph.initializer:
        if math.prod(t.dims) > 16:
            continue
        if uses_external_data(t):
            if base_dir is None:
                continue
            t = TensorProto.FromString(t.SerializeToString())
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = TensorProto.DEFAULT
        values[t.name] = numpy_helper.to_array(t)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
            if math.prod(tensor.dims) <= 16:
                values[node.output[0]] = numpy_helper.to_array(tensor)
    return values


def _axes(node, rank):
    for attr in node.attribute:
        if attr.name == "axes":
            return sorted(a % rank for a in attr.ints)
    return None


def _keepdims(node):
    return all(attr.i == 1 for attr in node.attribute if attr.name == "keepdims")


def _only(consumers, name, op_type):
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _match_normalization(mean, shapes, producer, consumers, constants, outputs):
    """(x, axis, eps, nodes, normalized shape) of one exported normalisation starting at ReduceMean ``mean``, or
    None."""
    x = mean.input[0]
    shape = shapes.get(x)
    if shape is None or not _keepdims(mean):
        return None
    rank = len(shape)
    axes = _axes(mean, rank)
    if not axes or axes != list(range(axes[0], rank)):
        return None
    sub = _only(consumers, mean.output[0], "Sub")
    if sub is None or list(sub.input) != [x, mean.output[0]]:
        return None
    d = sub.output[0]
    users = list({id(n): n for n in consumers.get(d, [])}.values())  # Mul(d, d) is listed once per input
    square = next((n for n in users if n.op_type == "Mul" and list(n.input) == [d, d]), None)
    div = next((n for n in users if n.op_type == "Div" and n.input[0] == d), None)
    if square is None or div is None or len(users) != 2:
        return None
    var = _only(consumers, square.output[0], "ReduceMean")
    if var is None or _axes(var, rank) != axes or not _keepdims(var):
        return None
    add = _only(consumers, var.output[0], "Add")
    if add is None or add.input[0] != var.output[0] or add.input[1] not in constants:
        return None
    eps = constants[add.input[1]]
    if eps.size != 1:
        return None
    sqrt = _only(consumers, add.output[0], "Sqrt")
    if sqrt is None or _only(consumers, sqrt.output[0], "Div") is not div or div.input[1] != sqrt.output[0]:
        return None
    nodes = [mean, sub, square, var, add, sqrt, div]
    if any(out in outputs for n in nodes[:-1] for out in n.output):
        return None
    return x, axes[0], float(eps.reshape(())), nodes, [int(v) for v in shape[axes[0]:]]


def fuse_normalization(model, base_dir=None):
    """Replace the exported normalisations of ``model`` with LayerNormalization nodes; ``base_dir``: where its
    external tensors are (the epsilons may be among them).

    Returns ``(model, count)``: the model is converted to opset 17 first when anything matches (a new object
    then), and unchanged otherwise."""
    import numpy as np
    from onnx import helper, numpy_helper

    shapes = static_shapes(model)
    graph = model.graph
    name_nodes(graph)  # replacements below are keyed by node name
    producer, consumers = graph_maps(graph)
    constants = constant_values(graph, base_dir)
    outputs = {o.name for o in graph.output}
    matches = [m for node in graph.node if node.op_type == "ReduceMean"
               for m in [_match_normalization(node, shapes, producer, consumers, constants, outputs)] if m]
    if not matches:
        return model, 0
    model = upgrade_opset(model)
    graph = model.graph
    replacement, scales = {}, {}
    for i, (x, axis, eps, nodes, normalized_shape) in enumerate(matches):
        key = tuple(normalized_shape)
        if key not in scales:  # unit scale of the normalized shape (a broadcast scalar runs 2-4x slower); no bias
            scales[key] = f"{NORM_SCALE_PREFIX}{'x'.join(map(str, key))}"
            graph.initializer.append(numpy_helper.from_array(np.ones(key, np.float32), scales[key]))
        div = nodes[-1]
        replacement[div.name] = [helper.make_node(
            "LayerNormalization", [x, scales[key]], [div.output[0]], name=f"norm_{i}", axis=axis, epsilon=eps)]
        for n in nodes[:-1]:
            replacement[n.name] = []
    replace_nodes(graph, replacement, key=lambda node: node.name)  # the opset conversion made new node objects
    logger.info("fused %d normalisations into LayerNormalization", len(matches))
    return model, len(matches)
