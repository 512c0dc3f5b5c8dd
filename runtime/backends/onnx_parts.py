"""Cut a chain-shaped ONNX graph into parts that run one after another.

A graph that runs once per call (the CLIP image encoder) reads each weight once. Run whole, all of its
memory-mapped weight pages are resident at the end of the run, on top of the UNet's. Run in parts, each part's pages
can be given back before the next part's come in, so the overlap is one part (see docs/performance.md). The parts
are run by ort_graph.

A cut goes after a node where exactly one computed tensor is still needed later (between two transformer layers:
the residual stream), so each part takes one tensor in and hands one tensor on. Nodes keep their order and
attributes, so a part computes what the same nodes compute in the whole graph.
"""

import logging

logger = logging.getLogger(__name__)


def external_sizes(graph):
    """{initializer name: bytes} for the initializers of ``graph`` stored in external files."""
    from onnx.external_data_helper import uses_external_data

    sizes = {}
    for tensor in graph.initializer:
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            sizes[tensor.name] = int(info.get("length", 0))
    return sizes


def _has_subgraphs(graph):
    import onnx

    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in kinds for node in graph.node for a in node.attribute)


def constant_nodes(graph):
    """Indices of the nodes that read initializers, or what other such nodes compute, alone: ONNX Runtime folds
    them when it builds the session (e.g. a text encoder's causal mask). An initializer that is also a graph input
    can be overridden, so it is not a constant."""
    overridable = {v.name for v in graph.input}
    constants = {t.name for t in graph.initializer if t.name not in overridable}
    folded = []
    for index, node in enumerate(graph.node):  # in topological order, as ONNX requires
        if all(name in constants for name in node.input if name):
            constants.update(name for name in node.output if name)
            folded.append(index)
    return folded


def constant_outputs(graph):
    """{tensor name: producing node} for the tensors the constant nodes compute (see constant_nodes): a part that
    needs one gets a copy of its nodes."""
    return {name: graph.node[index] for index in constant_nodes(graph) for name in graph.node[index].output if name}


def cut_points(graph, sizes=None):
    """[(node index, tensor name, weight bytes read up to and including that node)] for every node after which
    exactly one computed tensor (or graph input) is still needed: cutting there leaves one tensor to pass. Tensors
    computed from initializers alone do not count (see constant_outputs). ``sizes`` ({initializer: bytes}) are the
    weights counted; by default those in external files."""
    constants = {t.name for t in graph.initializer} | set(constant_outputs(graph))
    sizes = external_sizes(graph) if sizes is None else sizes
    end = len(graph.node)
    last_use = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in constants:
                last_use[name] = index
    for output in graph.output:
        last_use[output.name] = end
    live = {v.name for v in graph.input if v.name not in constants}
    seen, read, cuts = set(), 0, []
    for index, node in enumerate(graph.node[:-1]):
        for name in node.input:
            if name in sizes and name not in seen:
                seen.add(name)
                read += sizes[name]
        live.update(name for name in node.output if name and name not in constants)
        live = {name for name in live if last_use.get(name, -1) > index}
        if len(live) == 1:
            cuts.append((index, next(iter(live)), read))
    return cuts


def plan_cuts(graph, part_bytes, sizes=None):
    """The cut points that split ``graph`` into parts of about ``part_bytes`` of weights each ([] where the graph
    is small enough, has nested graphs, or has no cut point). ``sizes`` as for :func:`cut_points`."""
    sizes = external_sizes(graph) if sizes is None else sizes
    total = sum(sizes.values())
    parts = int(-(-total // part_bytes)) if part_bytes and part_bytes > 0 else 1
    if parts < 2 or _has_subgraphs(graph):
        return []
    cuts = cut_points(graph, sizes)
    chosen = []
    for k in range(1, parts):
        target = total * k / parts
        candidates = [c for c in cuts if not chosen or c[0] > chosen[-1][0]]
        if not candidates:
            break
        best = min(candidates, key=lambda c: abs(c[2] - target))
        if 0 < best[2] < total:
            chosen.append(best)
    return chosen


def split_file(path, part_bytes, sizes=None):
    """The parts of the ONNX graph file at ``path`` (see :func:`split_model`) with about ``part_bytes`` of the
    weights ``sizes`` each (see :func:`plan_cuts`), or None where it runs whole. The weights are not loaded."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    cuts = plan_cuts(model.graph, part_bytes, sizes)
    return split_model(model, cuts) if cuts else None


def _value_info(graph, name):
    for value in list(graph.value_info) + list(graph.output) + list(graph.input):
        if value.name == name:
            return value
    return None


def split_model(model, cuts):
    """The parts of ``model`` between ``cuts`` (from :func:`plan_cuts`), as ModelProtos: the first takes the
    model's inputs, the last gives its outputs, each other one takes and gives the one tensor at its cuts. Their
    initializers keep their external data references. None where a cut tensor's type is not recorded in the model
    (run ``onnx.shape_inference`` on it)."""
    import onnx

    graph = model.graph
    if model.functions:
        logger.info("%s: model-local functions are not cut, so it runs whole", graph.name)
        return None
    boundaries = []
    for _, name, _ in cuts:
        value = _value_info(graph, name)
        if value is None or not value.type.HasField("tensor_type"):
            logger.info("%s: no recorded type for the cut tensor %r, so it runs whole", graph.name, name)
            return None
        boundaries.append(value)
    initializers = {t.name: t for t in graph.initializer}
    starts = [0] + [index + 1 for index, _, _ in cuts]
    stops = [index + 1 for index, _, _ in cuts] + [len(graph.node)]
    parts = []
    constant = constant_outputs(graph)
    order = {id(node): index for index, node in enumerate(graph.node)}
    for number, (start, stop) in enumerate(zip(starts, stops)):
        nodes = list(graph.node[start:stop])
        # copies of the constant nodes this part reads but another part computes
        needed, pending = {}, [name for node in nodes for name in node.input]
        while pending:
            node = constant.get(pending.pop())
            if node is not None and not start <= order[id(node)] < stop and id(node) not in needed:
                needed[id(node)] = node
                pending.extend(node.input)
        nodes = sorted(needed.values(), key=lambda node: order[id(node)]) + nodes
        used = {name for node in nodes for name in node.input if name}
        inputs = [v for v in graph.input if v.name in used or v.name not in initializers] if number == 0 \
            else [boundaries[number - 1]]
        outputs = list(graph.output) if number == len(cuts) else [boundaries[number]]
        part = onnx.helper.make_graph(
            nodes, f"{graph.name}_part{number}", inputs, outputs,
            initializer=[initializers[name] for name in sorted(used & set(initializers))],
        )
        parts.append(onnx.helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version))
    return parts
