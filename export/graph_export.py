"""Export one graph (one GraphSpec, for each of its buckets, in each format), then check it against the MindSpore
model it came from.

Exporting (:func:`export_graph`) and checking (:func:`check_graphs`) are two passes so that the caller can free the
MindSpore model in between: at real size the model, an ONNX Runtime session and a loaded MindIR each hold a full
copy of the weights. Both passes run in the exporting process or in child processes alike (see isolation.py).
"""

import dataclasses
import logging

from framegraph.export import check, probe_check
from framegraph.export.mindir_graph import export_mindir, write_converter_config
from framegraph.export.onnx_graph import SharedWeights, export_onnx
from framegraph.export.quantize import QUANTIZED_GRAPHS
from framegraph.runtime.manifest import GraphEntry, graph_key

logger = logging.getLogger(__name__)

BUCKET_TAGS = {"num_frames": "f", "batch": "b", "height": "h", "width": "w", "chunk": "n"}


def bucket_tag(bucket):
    """A bucket in file names and labels: ``{"num_frames": 14, "batch": 2}`` -> ``f14_b2``."""
    return "_".join(f"{BUCKET_TAGS.get(k, k)}{v}" for k, v in bucket.items())


def planned_keys(name, buckets, formats):
    """The manifest keys of graph ``name`` for these buckets and formats."""
    return [graph_key(name, fmt, b) for b in buckets for fmt in formats]


@dataclasses.dataclass
class ExportedGraph:
    """A written graph awaiting its check: the MindSpore reference outputs are kept, the model is not."""

    entry: GraphEntry
    files: list
    inputs: list
    reference: list
    label: str
    check_file: object = None  # the graph run by the check where it is not the exported one (a probe's)


def graph_mode_on_cpu():
    """MindSpore as every export runs it: graph mode (what the exported graphs are traced in) on the CPU."""
    import mindspore as ms

    ms.set_device("CPU")  # MindSpore 2.10 warns that set_context(device_target=...) is deprecated
    ms.set_context(mode=ms.GRAPH_MODE)


def apply_graph_options(net, options):
    """Apply the export options that change a model's graph but not its numbers (forward chunking, attention
    slicing); returns ``net``."""
    from framegraph.models.layers import set_attention_slicing

    if options.forward_chunk_size and hasattr(net, "enable_forward_chunking"):
        net.enable_forward_chunking(options.forward_chunk_size)
    set_attention_slicing(net, options.attention_slice_mb)
    return net


def probe_multiple(recipe, options):
    """The size multiple of the probes that check this export's large buckets (probe_check.py), or None where no
    graph is checked on probes (no check, or --full-check)."""
    return recipe.size_multiple if options.check and not options.full_check else None


def export_graph(writer, spec, make_cell, buckets, formats, dtype, run_check=True, progress=None, weights=None,
                 quantize=None, probes=None):
    """Export ``make_cell(bucket)`` (a MindSpore cell) for every bucket in every format into ``writer``; returns the
    ExportedGraphs, which :func:`check_graphs` checks.

    ``writer``: anything with ``path(rel)`` (an ArtifactWriter, or a child process's view of its staging folder).
    ``weights``: the SharedWeights the ONNX graphs write into (default: a new ``<spec.weights_folder>/weights.bin``).
    ``quantize``: "int8" quantizes the ONNX graphs of the graphs that support it (QUANTIZED_GRAPHS: the UNet).
    ``probes``: the size multiple of the probes that check the buckets too large to run (``probe_multiple``).
    """
    import mindspore as ms

    quantize = quantize if spec.name in QUANTIZED_GRAPHS else None

    name, folder = spec.name, spec.weights_folder  # graph files sit beside the weights they read
    if weights is None and "onnx" in formats:
        weights = SharedWeights(writer.path(f"{spec.weights_folder}/weights.bin"))
    exported = []
    for bucket in buckets:
        tag = bucket_tag(bucket)
        cell = make_cell(bucket)
        inputs = spec.sample_inputs(bucket, dtype)
        ms_inputs = [ms.Tensor(x) for x in inputs]
        in_specs, out_specs = spec.input_specs(bucket, dtype), spec.output_specs(bucket, dtype)
        probing = run_check and probe_check.uses_probes(bucket, probes)
        reference = check.run_reference(cell, inputs) if run_check and not probing else None
        for fmt in formats:
            if fmt == "onnx":
                path = export_onnx(cell, ms_inputs, writer.path(f"{folder}/{name}_{tag}.onnx"),
                                   [t.name for t in in_specs], [t.name for t in out_specs], weights, quantize)
                files = [path, weights.path]
            else:
                files = export_mindir(cell, ms_inputs, writer.path(f"{folder}/{name}_{tag}.mindir"))
                files.append(write_converter_config(writer.path(f"{folder}/{name}_{tag}.converter.cfg"), in_specs))
            tolerance = check.INT8_TOLERANCE if quantize and fmt == "onnx" else check.TOLERANCE[dtype]
            entry = GraphEntry(name=name, format=fmt, bucket=dict(bucket), files=[], inputs=in_specs,
                               outputs=out_specs, tolerance=tolerance)
            graph = ExportedGraph(entry, files, inputs, reference, f"{name}[{tag}].{fmt}")
            if probing:
                graph.check_file, entry.checked_on = probe_check.export_probes(
                    files[0], spec, make_cell, bucket, probes, dtype, weights, quantize, bucket_tag)
                graph.inputs = spec.sample_inputs(entry.checked_on, dtype)
                graph.reference = check.run_reference(make_cell(entry.checked_on), graph.inputs)
            exported.append(graph)
            if progress:
                progress(f"{name}[{tag}].{fmt}")
    if weights is not None:
        weights.save_index()
    return exported


def check_graph(graph, dtype):
    """Run one exported graph on its sample inputs; returns its scaled max error against the reference."""
    entry = graph.entry
    if entry.format == "onnx":
        outputs = check.run_onnx(graph.check_file or graph.files[0], [t.name for t in entry.inputs], graph.inputs)
    else:
        outputs = check.run_mindir(graph.files[0], graph.inputs)
    return check.compare(graph.label, outputs, graph.reference, dtype, entry.tolerance)


def check_graphs(writer, exported, dtype, run_check=True, run=None):
    """Check every exported graph (``run(check_graph, graph, dtype)`` where given, e.g. in a child process) and
    hash its files; returns their manifest GraphEntries."""
    entries = []
    for graph in exported:
        entry = graph.entry
        if run_check:
            entry.max_abs_error = run(check_graph, graph, dtype) if run else check_graph(graph, dtype)
        entry.files = [writer.entry(p) for p in graph.files]
        entries.append(entry)
    return entries
