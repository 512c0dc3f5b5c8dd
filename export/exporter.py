"""Export one component's graphs (all its buckets, all formats), each checked against the MindSpore model."""

import gc
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


def export_component(writer, spec, make_cell, buckets, formats, dtype, run_check=True, progress=None):
    """Export ``make_cell(bucket)`` (a MindSpore cell) for every bucket in every format into ``writer``; returns the GraphEntries."""
    import mindspore as ms

    name = spec.name
    weights = SharedWeights(writer.path(f"{name}/weights.bin")) if "onnx" in formats else None
    pending = []  # (entry, [paths]) - file hashes are taken once the shared weights file is complete
    for bucket in buckets:
        tag = bucket_tag(bucket)
        cell = make_cell(bucket)
        inputs = spec.sample_inputs(bucket, dtype)
        ms_inputs = [ms.Tensor(x) for x in inputs]
        in_specs, out_specs = spec.input_specs(bucket, dtype), spec.output_specs(bucket, dtype)
        names = [t.name for t in in_specs]
        reference = check.run_mindspore(cell, inputs) if run_check else None
        for fmt in formats:
            label = f"{name}[{tag}].{fmt}"
            if fmt == "onnx":
                path = export_onnx(cell, ms_inputs, writer.path(f"{name}/{name}_{tag}.onnx"), names,
                                   [t.name for t in out_specs], weights)
                files = [path, weights.path]
                outputs = check.run_onnx(path, names, inputs) if run_check else None
            else:
                files = export_mindir(cell, ms_inputs, writer.path(f"{name}/{name}_{tag}.mindir"))
                config = write_converter_config(writer.path(f"{name}/{name}_{tag}.converter.cfg"), in_specs)
                files = files + [config]
                outputs = check.run_mindir(files[0], inputs) if run_check else None
            error = check.compare(label, outputs, reference, dtype) if run_check else None
            entry = GraphEntry(name=name, format=fmt, bucket=dict(bucket), files=[], inputs=in_specs,
                               outputs=out_specs, max_abs_error=error, tolerance=check.TOLERANCE[dtype])
            pending.append((entry, files))
            gc.collect()
            if progress:
                progress(label)
    entries = []
    for entry, files in pending:
        entry.files = [writer.entry(p) for p in files]
        entries.append(entry)
    return entries
