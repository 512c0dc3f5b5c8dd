"""MindSpore cell -> ONNX file, with weights moved into one external-data file shared by a component's buckets.

``mindspore.onnx.export`` embeds weights below 2 GB and writes one file per parameter above it. Either way the
post-pass here moves every initializer of at least ``EXTERNAL_MIN_BYTES`` into ``<component>/weights.bin`` (one
entry per distinct (name, content), so frame buckets of one model store their weights once), with paths relative to
the graph file so the artifact folder can be moved.
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from framegraph.export.onnx_fusions import drop_unused, fold_integer_constants, fuse_gelu, fuse_normalization
from framegraph.export.onnx_linear import fold_linear
from framegraph.export.onnx_small_conv import MAX_OUTPUT_POSITIONS, convs_to_matmul
from framegraph.export.quantize import drop_unused_domains, quantize_int8

logger = logging.getLogger(__name__)

EXTERNAL_MIN_BYTES = 1024
STANDARD_DOMAINS = ("", "ai.onnx")


class SharedWeights:
    """An append-only external-data file: each distinct tensor (name + bytes) is written once."""

    def __init__(self, path, index_path=None):
        """``index_path``: where the index is kept between processes (isolated exports append to one file from
        several child processes); an existing index resumes the file instead of starting it empty."""
        self.path = Path(path)
        self.index_path = Path(index_path) if index_path else None
        self.index = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.index_path is not None and self.index_path.is_file() and self.path.is_file():
            entries = json.loads(self.index_path.read_text(encoding="utf-8"))
            self.index = {(e["name"], e["sha256"]): (e["offset"], e["length"]) for e in entries}
        else:
            self.path.unlink(missing_ok=True)  # a new file, never a write through a link to a reused one
            self.path.write_bytes(b"")

    def save_index(self):
        if self.index_path is None:
            return
        entries = [{"name": n, "sha256": h, "offset": o, "length": ln} for (n, h), (o, ln) in self.index.items()]
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        self.index_path.write_text(json.dumps(entries), encoding="utf-8")

    def add(self, name, data):
        key = (name, hashlib.sha256(data).hexdigest())
        if key not in self.index:
            with open(self.path, "ab") as f:
                offset = f.tell()
                pad = (-offset) % 64  # keep tensors aligned for memory mapping
                f.write(b"\0" * pad)
                f.write(data)
            self.index[key] = (offset + pad, len(data))
        return self.index[key]

    def locate(self, name, data):
        """(file, offset, length) of ``data`` once stored: :meth:`add`, in this file."""
        return (self.path, *self.add(name, data))


class ProbeWeights:
    """The weights of a probe export (``framegraph.export.probe_check``): a tensor that ``main`` (the artifact's
    SharedWeights) already holds is read from there, anything else is written to ``scratch`` (a SharedWeights outside
    the artifact), so that a probe never adds a byte to the artifact's weights."""

    def __init__(self, main, scratch):
        self.main, self.scratch = main, scratch

    def locate(self, name, data):
        import hashlib

        stored = self.main.index.get((name, hashlib.sha256(data).hexdigest()))
        return (self.main.path, *stored) if stored is not None else self.scratch.locate(name, data)


def _point_at(tensor, location, target_dir):
    """Make ``tensor`` read its data from ``location`` = (file, offset, length), relative to ``target_dir``."""
    from onnx import TensorProto

    path, offset, length = location
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", os.path.relpath(path, target_dir)), ("offset", str(offset)),
                       ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _initializer_bytes(tensor, graph_dir):
    """Raw bytes of an initializer, whether embedded or in an external file next to the graph."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if uses_external_data(tensor):
        info = {e.key: e.value for e in tensor.external_data}
        with open(Path(graph_dir) / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            length = info.get("length")
            return f.read(int(length)) if length is not None else f.read()
    if tensor.raw_data:
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def externalize(model, source_dir, target_dir, weights):
    """Point every large initializer of ``model`` (read relative to ``source_dir``) at ``weights`` (a
    SharedWeights), with locations relative to ``target_dir`` where the graph file will live."""
    from onnx.external_data_helper import uses_external_data

    for tensor in model.graph.initializer:
        was_external = uses_external_data(tensor)
        data = _initializer_bytes(tensor, source_dir)
        if len(data) < EXTERNAL_MIN_BYTES and not was_external:
            continue
        location = weights.locate(tensor.name, data)
        tensor.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            tensor.ClearField(field)
        _point_at(tensor, location, target_dir)


def parameters_to_initializers(model, cell, num_inputs, target_dir, weights, layouts=None):
    """Turn the graph inputs after the first ``num_inputs`` (the cell's parameters) into external initializers;
    ``layouts``: graph input name -> function giving the array to store from its parameter's array
    (``convs_to_matmul``, ``fold_linear``); a layout with a ``source`` attribute reads that parameter instead of
    the one named like the input."""
    from onnx import TensorProto, helper

    params = {p.name: p for p in cell.get_parameters()}
    params.update(dict(cell.parameters_and_names()))
    graph = model.graph
    keep = []
    for i, value in enumerate(graph.input):
        if i < num_inputs:
            keep.append(value)
            continue
        layout = (layouts or {}).get(value.name)
        source = getattr(layout, "source", value.name)
        if source not in params:
            raise RuntimeError(f"exported graph input {value.name!r} is neither a spec input nor a parameter")
        array = params[source].asnumpy()
        if layout is not None:
            array = layout(array)
        tensor = TensorProto(name=value.name, dims=list(array.shape),
                             data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        _point_at(tensor, weights.locate(value.name, array.tobytes()), target_dir)
        graph.initializer.append(tensor)
        del array
    del graph.input[:]
    graph.input.extend(keep)


def rename_io(model, input_names, output_names):
    """Give the graph's inputs and outputs the spec's names, rewiring every node that uses them."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != len(input_names) or len(graph.output) != len(output_names):
        raise RuntimeError(
            f"exported graph has {len(inputs)} inputs / {len(graph.output)} outputs, spec has "
            f"{len(input_names)} / {len(output_names)}"
        )
    mapping = {v.name: new for v, new in zip(inputs, input_names)}
    mapping.update({v.name: new for v, new in zip(graph.output, output_names)})
    for value in list(inputs) + list(graph.output):
        value.name = mapping[value.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]


def fix_conv_pads(model):
    """MindSpore writes a Conv's ``pads`` as (top, bottom, left, right); ONNX reads (top, left, bottom, right)."""
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        for attr in node.attribute:
            if attr.name == "pads" and len(attr.ints) == 4:
                top, bottom, left, right = attr.ints
                attr.ints[:] = [top, left, bottom, right]


def export_onnx(cell, inputs, path, input_names, output_names, weights, quantize=None, size_ratio=1):
    """Export ``cell`` on sample ``inputs`` (MindSpore tensors) to ``path`` with weights in ``weights`` (a
    SharedWeights or ProbeWeights); ``quantize="int8"`` stores int8 weights (``framegraph.export.quantize``) instead of
    the float ones. ``size_ratio``: the exported size's pixels over those of the size whose graph this one stands for
    (a probe's, see probe_check.py), so that the size-dependent rewrites choose as they do at that size."""
    import mindspore as ms
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = path.parent / f".{path.stem}.raw"
    stage.mkdir(exist_ok=True)
    raw = stage / "graph.onnx"
    # Names are set here rather than by the exporter, which renames a graph output without renaming the node
    # output that feeds it when that name is shared inside the graph (seen on the temporal VAE decoder).
    # Parameters are exported as graph inputs (export_params=False) and written by ``parameters_to_initializers``
    # one at a time: the exporter's own weight serialisation holds extra full copies of the weights in memory.
    ms.onnx.export(cell, *inputs, file_name=str(raw), export_params=False)
    model = onnx.load(str(raw), load_external_data=False)
    # before the weights are attached (shape inference and opset conversion then see a small graph), after the
    # Conv pads are right (shape inference reads them)
    fix_conv_pads(model)
    fold_integer_constants(model)
    model, _ = fuse_normalization(model, stage)
    layouts = convs_to_matmul(model, [v.name for v in model.graph.input[len(input_names):]],
                              MAX_OUTPUT_POSITIONS * size_ratio)
    layouts.update(fold_linear(model, [v.name for v in model.graph.input[len(input_names):]], stage))
    # A quantized graph goes through a float copy in the staging folder first, so that the shared weights file
    # only ever receives the int8 tensors.
    first = SharedWeights(stage / "float.bin") if quantize else weights
    target_dir = stage if quantize else path.parent
    externalize(model, stage, target_dir, first)  # large constants the exporter folded
    parameters_to_initializers(model, cell, len(input_names), target_dir, first, layouts)
    rename_io(model, input_names, output_names)
    fuse_gelu(model)
    if quantize:
        onnx.save(model, str(stage / "float.onnx"))
        quantize_int8(stage / "float.onnx", stage / "int8.onnx")
        model = onnx.load(str(stage / "int8.onnx"), load_external_data=False)
        drop_unused_domains(model)
        externalize(model, stage, path.parent, weights)
    drop_unused(model.graph)
    onnx.save(model, str(path))
    shutil.rmtree(stage)
    logger.info("wrote %s (%d ops)", path, len(model.graph.node))
    return path


def op_types(path):
    """Sorted (domain, op_type) pairs used by the ONNX graph at ``path`` (weights not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sorted({(n.domain or "", n.op_type) for n in model.graph.node})


def opset_version(path):
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS)
