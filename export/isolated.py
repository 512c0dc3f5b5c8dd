"""Export and check large components in short-lived child processes.

MindSpore keeps the memory of every graph it compiles until the process ends, and exporting one graph compiles the
model up to three times (the reference run, the ONNX export, the MindIR export). At real size (SVD-XT's 6.1 GB UNet)
that does not fit in 24 GiB. So each (graph, bucket, format) of a large component is exported by its own child
process, which rebuilds the component (the same weights: read from the same files, or built with the same seed),
and each written graph is checked in a child process of its own. The parent never holds the model.
"""

import copy
import dataclasses
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

ISOLATE_MODES = ("auto", "always", "never")
# Components whose parameters take at least this much memory are exported in child processes under "auto".
AUTO_MIN_BYTES = 1 << 30
SCRATCH = ".scratch"


class ExportChildDied(RuntimeError):
    """A child process died without reporting an error (killed by a signal, usually out of memory)."""


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
        from framegraph.export.components import PipelineFolder

        return PipelineFolder(self.folder, variant=self.variant, dtype=self.dtype,
                              random_weights=self.random_weights, seed=self.seed)


def should_isolate(pipeline, component, mode):
    if mode != "auto":
        return mode == "always"
    size = pipeline.parameter_bytes(component)
    isolate = size >= AUTO_MIN_BYTES
    if isolate:
        logger.info("%s has %.2f GB of parameters: exporting it in child processes", component, size / 1e9)
    return isolate


def run_in_child(label, function, *args):
    """``function(*args)`` in a fresh Python process (``python -m framegraph.export.child``); its exceptions are
    re-raised here. A fresh interpreter rather than multiprocessing, whose spawn re-runs the caller's main script."""
    level = logging.getLogger().getEffectiveLevel()
    with tempfile.TemporaryDirectory(prefix="framegraph-child-") as tmp:
        request, reply = Path(tmp) / "request.pkl", Path(tmp) / "reply.pkl"
        with open(request, "wb") as f:
            pickle.dump((function, args, level), f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "framegraph.export.child", str(request), str(reply),
                               str(os.getpid())], env=env)
        if proc.returncode == 0 and reply.is_file():
            with open(reply, "rb") as f:
                ok, value = pickle.load(f)
            if ok:
                return value
            raise value
        if proc.returncode < 0:
            how = f"was killed by {signal.Signals(-proc.returncode).name}"
        else:
            how = f"exited with status {proc.returncode}"
        raise ExportChildDied(
            f"the child process for {label} {how} without reporting an error (running out of memory is the usual "
            "cause): close other programs, or export fewer formats or buckets per run"
        )


class _Stage:
    """The part of ArtifactWriter a child process needs: paths inside the staging folder."""

    def __init__(self, stage):
        self.stage = Path(stage)

    def path(self, rel):
        from framegraph.export.artifact import stage_path

        return stage_path(self.stage, rel)


def _export_unit(source, options, stage, component, name, bucket, fmt, with_reference):
    from framegraph.export.exporter import export_component
    from framegraph.export.onnx_graph import SharedWeights
    from framegraph.export.pipeline_export import configure, graph_mode_on_cpu
    from framegraph.export.registry import recipe_for

    graph_mode_on_cpu()
    pipeline = source.open()
    recipe = recipe_for(pipeline, copy.deepcopy(options))
    factory = dict(recipe.components)[component][name]
    writer = _Stage(stage)
    weights = None
    if fmt == "onnx":
        weights = SharedWeights(writer.path(f"{name}/weights.bin"), writer.path(f"{SCRATCH}/{name}.weights.json"))
    net = configure(pipeline.build(component), options)
    return export_component(writer, recipe.specs[name], lambda b: factory(net, b), [bucket], [fmt], options.dtype,
                            with_reference, None, weights, options.quantize)


def export_isolated(pipeline, options, stage, component, names, wanted, progress=None):
    """Export graphs ``names`` of ``component`` for buckets ``wanted[name]``, one child process per graph, bucket
    and format. The MindSpore reference outputs come from the first format's child."""
    from framegraph.export.exporter import bucket_tag

    source = Source.of(pipeline)
    exported = []
    for name in names:
        for bucket in wanted[name]:
            first = None
            for fmt in options.formats:
                label = f"{name}[{bucket_tag(bucket)}].{fmt}"
                (graph,) = run_in_child(label, _export_unit, source, options, str(stage), component, name, bucket,
                                        fmt, options.check and first is None)
                if first is None:
                    first = graph
                else:
                    graph.reference = first.reference
                exported.append(graph)
                if progress:
                    progress(label)
    return exported


def run_check_in_child(function, graph, dtype):
    return run_in_child(f"the check of {graph.label}", function, graph, dtype)
