"""Export one component's graphs (all its buckets, all formats), then check each against the MindSpore model.

Exporting and checking are two passes so that the caller can free the MindSpore model in between: at real size
the model, an ONNX Runtime session and a loaded MindIR each hold a full copy of the weights.
"""

import dataclasses
import logging

from framegraph.export import check
from framegraph.export.mindir_graph import export_mindir, write_converter_config
from framegraph.export.onnx_graph import SharedWeights, export_onnx
from framegraph.runtime.manifest import GraphEntry, graph_key

logger = logging.getLogger(__name__)

BUCKET_TAGS = {"num_frames": "f", "batch": "b", "height": "h", "width": "w", "chunk": "n"}


def bucket_tag(bucket):
    return "_".join(f"{BUCKET_TAGS.get(k, k)}{v}" for k, v in bucket.items())


def planned_keys(name, buckets, formats):
    return [graph_key(name, fmt, b) for b in buckets for fmt in formats]


@dataclasses.dataclass
class ExportedGraph:
    """A written graph awaiting its check: the MindSpore reference outputs are kept, the model is not."""

    entry: GraphEntry
    files: list
    inputs: list
    reference: list
    label: str


def export_component(writer, spec, make_cell, buckets, formats, dtype, run_check=True, progress=None, weights=None,
                     quantize=None):
    """Export ``make_cell(bucket)`` (a MindSpore cell) for every bucket in every format into ``writer``.

    ``weights``: the SharedWeights the ONNX graphs write into (default: a new ``<name>/weights.bin``).
    ``quantize``: "int8" quantizes the ONNX graphs of the components that support it (the UNet).
    """
    from framegraph.export.quantize import QUANTIZED_GRAPHS

    quantize = quantize if spec.name in QUANTIZED_GRAPHS else None
    import mindspore as ms

    name = spec.name
    if weights is None and "onnx" in formats:
        weights = SharedWeights(writer.path(f"{name}/weights.bin"))
    exported = []
    for bucket in buckets:
        tag = bucket_tag(bucket)
        cell = make_cell(bucket)
        inputs = spec.sample_inputs(bucket, dtype)
        ms_inputs = [ms.Tensor(x) for x in inputs]
        in_specs, out_specs = spec.input_specs(bucket, dtype), spec.output_specs(bucket, dtype)
        reference = check.run_reference(cell, inputs) if run_check else None
        for fmt in formats:
            if fmt == "onnx":
                path = export_onnx(cell, ms_inputs, writer.path(f"{name}/{name}_{tag}.onnx"),
                                   [t.name for t in in_specs], [t.name for t in out_specs], weights, quantize)
                files = [path, weights.path]
            else:
                files = export_mindir(cell, ms_inputs, writer.path(f"{name}/{name}_{tag}.mindir"))
                files.append(write_converter_config(writer.path(f"{name}/{name}_{tag}.converter.cfg"), in_specs))
            tolerance = check.INT8_TOLERANCE if quantize and fmt == "onnx" else check.TOLERANCE[dtype]
            entry = GraphEntry(name=name, format=fmt, bucket=dict(bucket), files=[], inputs=in_specs,
                               outputs=out_specs, tolerance=tolerance)
            exported.append(ExportedGraph(entry, files, inputs, reference, f"{name}[{tag}].{fmt}"))
            if progress:
                progress(f"{name}[{tag}].{fmt}")
    if weights is not None:
        weights.save_index()
    return exported


def check_graph(graph, dtype):
    """Run one exported graph on its sample inputs; returns its scaled max error against the reference."""
    entry = graph.entry
    if entry.format == "onnx":
        outputs = check.run_onnx(graph.files[0], [t.name for t in entry.inputs], graph.inputs)
    else:
        outputs = check.run_mindir(graph.files[0], graph.inputs)
    return check.compare(graph.label, outputs, graph.reference, dtype, entry.tolerance)


def check_exported(writer, exported, dtype, run_check=True, run=None):
    """Check every exported graph (``run(check_graph, graph, dtype)`` where given, e.g. in a child process) and
    hash its files."""
    entries = []
    for graph in exported:
        entry = graph.entry
        if run_check:
            entry.max_abs_error = run(check_graph, graph, dtype) if run else check_graph(graph, dtype)
        entry.files = [writer.entry(p) for p in graph.files]
        entries.append(entry)
    return entries
