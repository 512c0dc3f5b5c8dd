"""Export and check a component's graphs in short-lived child processes.

MindSpore keeps the memory of every graph it compiles until the process ends, and exporting one graph compiles the
model up to three times (the reference run, the ONNX export, the MindIR export). At real size (SVD-XT's UNet) that
does not fit in 24 GiB. So each (graph, bucket, format) of an isolated component is exported by its own child
process, which rebuilds the component (the same weights: read from the same files, or built with the same seed) and
the recipe (the same recipe function on the same options), and each written graph is checked in a child process of
its own. The parent never holds the model. Which components are isolated is :func:`should_isolate`'s rule.
"""

import copy
import dataclasses
import logging
from pathlib import Path

from framegraph.export.artifact import stage_path
from framegraph.export.child import run_in_child
from framegraph.export.graph_export import (apply_graph_options, bucket_tag, export_graph, graph_mode_on_cpu,
                                            probe_multiple)
from framegraph.export.onnx_graph import SharedWeights
from framegraph.export.options import SCRATCH
from framegraph.export.pipeline_folder import PipelineFolder

logger = logging.getLogger(__name__)

# Components whose parameters take at least this much memory are exported in child processes under "auto".
AUTO_MIN_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Source:
    """What a child process needs to open the same pipeline folder (picklable)."""

    folder: str
    variant: str
    dtype: str
    random_weights: bool
    seed: int

    @classmethod
    def of(cls, pipeline):
        return cls(str(pipeline.folder), pipeline.variant, pipeline.dtype, pipeline.random_weights, pipeline.seed)

    def open(self):
        return PipelineFolder(self.folder, variant=self.variant, dtype=self.dtype,
                              random_weights=self.random_weights, seed=self.seed)


def should_isolate(pipeline, component, mode, probed=False):
    """Whether ``component`` is exported in child processes: always or never as ``mode`` (--isolate) says, and
    under "auto" when its parameters take at least AUTO_MIN_BYTES or when some of its graphs are ``probed``
    (checked on probe sizes, export/probe_check.py: the MindSpore memory of their exports and reference runs would
    otherwise stay in the exporting process while the next components export)."""
    if mode != "auto":
        return mode == "always"
    size = pipeline.parameter_bytes(component)
    isolate = size >= AUTO_MIN_BYTES or probed
    if isolate:
        logger.info("%s (%.2f GB of parameters%s): exporting it in child processes", component, size / 1e9,
                    ", checked on probe sizes" if probed else "")
    return isolate


class _Stage:
    """The part of ArtifactWriter a child process needs: paths inside the staging folder."""

    def __init__(self, stage):
        self.stage = Path(stage)

    def path(self, rel):
        return stage_path(self.stage, rel)


def _export_in_child(source, options, recipe_function, stage, component, name, bucket, fmt, with_reference):
    """A child process's work: one graph, one bucket, one format, written into the parent's staging folder."""
    graph_mode_on_cpu()
    pipeline = source.open()
    recipe = recipe_function(pipeline, copy.deepcopy(options))
    factory = dict(recipe.components)[component][name]
    writer = _Stage(stage)
    weights = None
    if fmt == "onnx":
        group = recipe.specs[name].weights_folder  # graphs of one weights group append to one file, in turn
        weights = SharedWeights(writer.path(f"{group}/weights.bin"), writer.path(f"{SCRATCH}/{group}.weights.json"))
    net = apply_graph_options(pipeline.build(component), options)
    return export_graph(writer, recipe.specs[name], lambda b: factory(net, b), [bucket], [fmt], options.dtype,
                        with_reference, None, weights, options.quantize, probe_multiple(recipe, options))


def export_in_children(pipeline, options, recipe_function, stage, component, names, wanted, formats,
                       progress=None):
    """Export graphs ``names`` of ``component`` for buckets ``wanted[name]`` in ``formats``, one child process per
    graph, bucket and format; returns the ExportedGraphs. The MindSpore reference outputs come from the first
    format's child."""
    source = Source.of(pipeline)
    exported = []
    for name in names:
        for bucket in wanted[name]:
            first = None
            for fmt in formats:
                label = f"{name}[{bucket_tag(bucket)}].{fmt}"
                (graph,) = run_in_child(label, _export_in_child, source, options, recipe_function, str(stage),
                                        component, name, bucket, fmt, options.check and first is None)
                if first is None:
                    first = graph
                else:
                    graph.reference = first.reference
                exported.append(graph)
                if progress:
                    progress(label)
    return exported


def check_in_child(function, graph, dtype):
    """``function(graph, dtype)`` (graph_export.check_graph) in a child process: the run of a loaded graph frees
    its memory when the child exits."""
    return run_in_child(f"the check of {graph.label}", function, graph, dtype)
