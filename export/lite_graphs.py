"""The MindSpore Lite format (``--formats mslite``): every Lite graph is converted from the component's ONNX graph
after that graph has passed its check, then checked itself.

Why from ONNX: MindSpore 2.10 writes MindIR that Lite 2.0 refuses (a newer MindIR version), while Lite's converter
reads ONNX. The converter runs with framegraph's Lite-safe rewrites (lite_rewrites.py: ops Lite 2.0 computes wrongly
without an error), so the converted graph is run on the same sample inputs and compared with the MindSpore model's
outputs, exactly as the ONNX and MindIR graphs are; its measured error goes into the manifest. Conversion and check
each run in a child process (lite_convert.py): Lite and MindSpore cannot be loaded into one process.

With ``mslite`` but without ``onnx`` in ``--formats``, the ONNX graphs are still exported and checked (they are the
conversion's source) and then removed from the artifact.
"""

import logging
from pathlib import Path

import numpy as np

from framegraph.export import check
from framegraph.runtime.manifest import GraphEntry

logger = logging.getLogger(__name__)

LITE = "mslite"


def traced_formats(formats):
    """The formats exported from the MindSpore model for ``formats``: ONNX also when only the Lite graphs ask for
    it, in the order onnx, mindir."""
    wanted = set(formats) | ({"onnx"} if LITE in formats else set())
    return tuple(f for f in ("onnx", "mindir") if f in wanted)


def require_lite(formats):
    """Refuse ``--formats mslite`` before any model is loaded when no MindSpore Lite runtime is set up here."""
    if LITE not in formats:
        return None
    from framegraph.runtime.lite.install import find_lite

    install = find_lite()
    if install is None:
        raise ValueError("--formats mslite needs the MindSpore Lite runtime and converter: run `framegraph "
                         "setup-lite` once (or set MSLITE_HOME to a MindSpore Lite package), then export again")
    return install


def lite_feed(array):
    """An input as the converted graph takes it: Lite's converter makes int64 graph inputs int32 (token ids fit)."""
    return array.astype(np.int32) if array.dtype == np.int64 else array


def lite_path(onnx_file):
    """``unet/unet_f14.onnx`` -> ``unet/unet_f14.ms``."""
    return onnx_file.with_suffix(".ms")


def convert_graphs(writer, exported, dtype, run_check=True, progress=None):
    """Convert every exported ONNX graph of ``exported`` (graph_export.ExportedGraph, already checked) into a Lite
    graph beside it, check it against the MindSpore reference kept in the ExportedGraph, and return the Lite
    GraphEntries (files hashed)."""
    from framegraph.export.lite_convert import convert_to_lite, run_lite

    entries = []
    for graph in exported:
        if graph.entry.format != "onnx":
            continue
        source = graph.entry
        target = lite_path(graph.files[0])
        label = graph.label.rsplit(".", 1)[0] + f".{LITE}"
        written = convert_to_lite(graph.files[0], target)  # the .ms, and its .msw weights past 2 GB
        entry = GraphEntry(name=source.name, format=LITE, bucket=dict(source.bucket),
                           files=[writer.entry(Path(p)) for p in written], inputs=source.inputs, outputs=source.outputs,
                           tolerance=check.TOLERANCE[dtype])
        if run_check:
            outputs = run_lite(target, [lite_feed(x) for x in graph.inputs])
            entry.max_abs_error = check.compare(label, outputs, graph.reference, dtype, entry.tolerance)
        entries.append(entry)
        if progress:
            progress(label)
    return entries


def drop_onnx(writer, entries):
    """Remove the ONNX graphs (entries and files) that were exported only as the Lite graphs' source; returns the
    other entries."""
    kept = [e for e in entries if e.format != "onnx"]
    for entry in entries:
        if entry.format == "onnx":
            for f in entry.files:
                path = writer.path(f.path)
                if path.exists():
                    path.unlink()
    return kept
