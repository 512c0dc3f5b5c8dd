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


def _graph_maps(graph):
    producer = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producer, consumers


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
    """Replace every exported erf-GELU subgraph of ``model`` (in place) by Div/Erf/Add/Mul/Mul; returns the count."""
    from onnx import TensorProto, helper

    graph = model.graph
    producer, consumers = _graph_maps(graph)
    outputs = {o.name for o in graph.output}
    constants = {"gelu_sqrt2": math.sqrt(2.0), "gelu_one": 1.0, "gelu_half": 0.5}
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
    existing = {t.name for t in graph.initializer}
    for name, value in constants.items():
        if name not in existing:
            graph.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
    replacement = {}
    for i, (x, (nodes, final)) in enumerate(matches):
        p = f"gelu_{i}"
        replacement[id(final)] = [
            helper.make_node("Div", [x, "gelu_sqrt2"], [f"{p}_scaled"], name=f"{p}_div"),
            helper.make_node("Erf", [f"{p}_scaled"], [f"{p}_erf"], name=f"{p}_erf"),
            helper.make_node("Add", [f"{p}_erf", "gelu_one"], [f"{p}_one_plus"], name=f"{p}_add"),
            helper.make_node("Mul", [x, f"{p}_one_plus"], [f"{p}_x_times"], name=f"{p}_mul"),
            helper.make_node("Mul", [f"{p}_x_times", "gelu_half"], [final.output[0]], name=f"{p}_half"),
        ]
        for n in nodes:
            if n is not final:
                replacement[id(n)] = []
    kept = []
    for node in graph.node:
        kept.extend(replacement.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(kept)
    logger.info("fused %d GELU subgraphs into Erf form", len(matches))
    return len(matches)
