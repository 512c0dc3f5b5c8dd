"""Export of a whole pipeline folder, driven by a recipe: which components, which graphs, which buckets.

Each pipeline kind (``svd.py``, ``t2v.py``) builds a :class:`Recipe`; this module builds one component at a time,
exports and checks its graphs, copies the side files and writes the manifest last.
"""

import dataclasses
import gc
import json
import logging
import numbers
import shutil

from framegraph import __version__
from framegraph.export import isolated
from framegraph.export.artifact import ArtifactWriter
from framegraph.export.exporter import check_exported, export_component, planned_keys
from framegraph.export.quantize import QUANTIZE_MODES
from framegraph.runtime.manifest import FORMATS, Manifest

logger = logging.getLogger(__name__)

# The largest float32 attention scores one slice of queries may hold (see models.layers.attention): it leaves every
# attention of the sizes measured here whole (SVD-XT's largest at 256x256, 8 frames: 335 MB) and slices those
# of the published sizes (576x1024, 25 frames: 85 GB whole).
DEFAULT_ATTENTION_SLICE_MB = 1024


@dataclasses.dataclass
class ExportOptions:
    frames: list = None  # frame-count buckets; default from the model config
    height: int = None
    width: int = None
    batch: int = 1
    formats: tuple = FORMATS
    dtype: str = "float32"
    decode_chunk_sizes: list = None
    check: bool = True
    isolate: str = "auto"  # export components in child processes: auto (large ones), always, never
    forward_chunk_size: int = None  # UNet feed-forward over slices of this many positions (lower peak memory)
    attention_slice_mb: float = DEFAULT_ATTENTION_SLICE_MB  # attention over query slices of at most this many MB
    quantize: str = None  # "int8": int8 UNet weights in the ONNX graphs (CPU)
    overwrite: bool = False  # replace an existing framegraph artifact at ``out`` (and reuse its matching graphs)

    def __post_init__(self):
        """Sizes and counts are positive integers and bucket lists are non-empty: ``None`` asks for the default, a
        zero or an empty list is refused (it must not silently become the default)."""
        check_sizes_and_counts(self)

    def fingerprint(self, source_hash):
        fields = dataclasses.asdict(self)
        fields.pop("check")
        fields.pop("isolate")
        fields.pop("overwrite")
        fields["formats"] = list(fields["formats"])
        return json.dumps({"framegraph": __version__, "source": source_hash, **fields}, sort_keys=True)


@dataclasses.dataclass
class Recipe:
    """What one pipeline kind exports. ``components``: (component folder, {graph name: cell factory}), where a
    cell factory takes the built model and a bucket and returns the cell to trace."""

    kind: str
    components: list
    specs: dict
    plan: list  # [(graph name, bucket)]
    constants: dict
    defaults: dict
    copied_files: tuple
    size_multiple: int
    required_files: tuple = ()  # copied files the runtime cannot work without


# ExportOptions field -> (its svd-export flag, whether None (the default) is allowed)
_COUNTS = {"batch": ("--batch", False), "height": ("--height", True), "width": ("--width", True),
           "forward_chunk_size": ("--forward-chunk-size", True)}
_COUNT_LISTS = {"frames": "--frames", "decode_chunk_sizes": "--decode-chunk-sizes"}


def _positive_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def check_sizes_and_counts(options):
    """Every size and count of ``options`` is a positive integer, and every bucket list a non-empty list of them;
    ``None`` (the default) is allowed where the pipeline supplies one. Errors name the svd-export flag and never
    suggest a value."""
    for name, (flag, optional) in _COUNTS.items():
        value = getattr(options, name)
        if value is None and optional:
            continue
        if not _positive_int(value):
            default = f"; leave ExportOptions.{name} None (omit {flag}) for the default" if optional else ""
            raise ValueError(f"{flag} (ExportOptions.{name}) must be a positive integer, got {value!r}{default}")
    for name, flag in _COUNT_LISTS.items():
        values = getattr(options, name)
        if values is None:
            continue
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values or not all(
                _positive_int(v) for v in values):
            raise ValueError(f"{flag} (ExportOptions.{name}) must be a non-empty list of positive integers, e.g. "
                             f"{flag} 14,25; got {values!r}; leave it None (omit {flag}) for the default")
    if not isinstance(options.overwrite, bool):
        raise ValueError(f"ExportOptions.overwrite (--overwrite) must be True or False, got {options.overwrite!r}")


def validate_options(options, size_multiple, folder):
    check_sizes_and_counts(options)
    for name in ("height", "width"):
        value = getattr(options, name)
        if value is None or value % size_multiple:
            raise ValueError(f"--{name} {value} must be a positive multiple of {size_multiple} for {folder}")
    if not options.frames:
        raise ValueError(f"--frames must be positive integers, got {options.frames}")
    if not options.formats or set(options.formats) - set(FORMATS):
        raise ValueError(f"--formats must be a subset of {','.join(FORMATS)}; got {','.join(options.formats)}")
    if options.dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16, got {options.dtype}")
    if options.attention_slice_mb is not None and not options.attention_slice_mb > 0:
        raise ValueError(f"--attention-slice-mb must be a positive number of MB, got {options.attention_slice_mb}; "
                         "0 on the command line (None in ExportOptions) computes each attention whole")
    if options.quantize is not None and (options.quantize not in QUANTIZE_MODES or "onnx" not in options.formats):
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)} and needs --formats with onnx "
                         f"(it applies to the ONNX graphs); got {options.quantize!r} with {','.join(options.formats)}")
    if options.isolate not in isolated.ISOLATE_MODES:
        raise ValueError(f"--isolate must be one of {', '.join(isolated.ISOLATE_MODES)}, got {options.isolate!r}")


def graph_mode_on_cpu():
    """MindSpore as every export runs it: graph mode (what the exported graphs are traced in) on the CPU."""
    import mindspore as ms

    ms.set_device("CPU")  # MindSpore 2.10 warns that set_context(device_target=...) is deprecated
    ms.set_context(mode=ms.GRAPH_MODE)


def export_pipeline(pipeline, out, options, recipe, source_name=None, progress=None):
    """Export ``pipeline`` (a PipelineFolder) following ``recipe`` into the artifact folder ``out``."""
    graph_mode_on_cpu()
    validate_options(options, recipe.size_multiple, pipeline.folder)
    _check_required_files(pipeline, recipe)
    source_hash = pipeline.weights_hash([c for c, _ in recipe.components])
    writer = ArtifactWriter(out, options.fingerprint(source_hash), overwrite=options.overwrite)
    try:
        graphs = []
        for component, factories in recipe.components:
            graphs += _component_graphs(writer, pipeline, component, factories, recipe, options, progress)
        for rel in recipe.copied_files:
            source = pipeline.folder / rel
            if source.is_dir():
                shutil.copytree(source, writer.path(rel), dirs_exist_ok=True)
            elif source.is_file():
                shutil.copy2(source, writer.path(rel))
        shutil.rmtree(writer.stage / isolated.SCRATCH, ignore_errors=True)
        manifest = _manifest(pipeline, recipe, options, graphs, source_name, source_hash, writer)
        return writer.commit(manifest)
    except BaseException:
        writer.abort()
        raise


def _check_required_files(pipeline, recipe):
    missing = [rel for rel in recipe.required_files if not (pipeline.folder / rel).exists()]
    if not missing:
        return
    if not pipeline.random_weights:
        raise FileNotFoundError(
            f"{pipeline.folder} has no {', '.join(missing)}, which the runtime needs; export the complete "
            "diffusers folder (as saved by save_pretrained or downloaded from the hub)"
        )
    logger.warning("%s has no %s: the artifact will lack it (random weights, for benchmarks); copy it into the "
                   "artifact folder to use it", pipeline.folder, ", ".join(missing))


def _component_graphs(writer, pipeline, component, factories, recipe, options, progress):
    wanted = {name: [b for n, b in recipe.plan if n == name] for name in factories}
    reused = {}
    for name in factories:
        entries = writer.reuse_component(name, planned_keys(name, wanted[name], options.formats), options.check)
        if entries is not None:
            reused[name] = entries
            for _ in entries if progress else ():
                progress(f"{name} (reused)")
    exported = []
    todo = [name for name in factories if name not in reused]
    in_child = bool(todo) and isolated.should_isolate(pipeline, component, options.isolate)
    if in_child:
        exported = isolated.export_isolated(pipeline, options, writer.stage, component, todo, wanted, progress)
    elif todo:
        exported = _export_built(writer, configure(pipeline.build(component), options), factories, reused, recipe,
                                 wanted, options, progress)
        gc.collect()  # the MindSpore model is freed before its graphs are loaded for the check
    run = isolated.run_check_in_child if in_child else None
    checked = check_exported(writer, exported, options.dtype, options.check, run)
    return [e for name in factories for e in reused.get(name, [])] + checked


def configure(net, options):
    """Apply the export options that change a model's graph but not its numbers (forward chunking, attention
    slicing)."""
    if options.forward_chunk_size and hasattr(net, "enable_forward_chunking"):
        net.enable_forward_chunking(options.forward_chunk_size)
    from framegraph.models.layers import set_attention_slicing

    set_attention_slicing(net, options.attention_slice_mb)
    return net


def _export_built(writer, net, factories, reused, recipe, wanted, options, progress):
    exported = []
    for name, factory in factories.items():
        if name not in reused:
            exported += export_component(writer, recipe.specs[name], lambda bucket, f=factory: f(net, bucket),
                                         wanted[name], options.formats, options.dtype, options.check, progress,
                                         quantize=options.quantize)
    return exported


def _manifest(pipeline, recipe, options, graphs, source_name, source_hash, writer):
    import mindspore as ms
    import onnx

    scheduler = json.loads((pipeline.folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    onnx_graphs = [g for g in graphs if g.format == "onnx"]
    files = []
    for rel in recipe.copied_files:
        path = writer.stage / rel
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return Manifest(
        pipeline=recipe.kind,
        source={
            "model": source_name or str(pipeline.folder),
            "weights_sha256": source_hash,
            "random_weights": pipeline.random_weights,
            "variant": pipeline.variant,
            "class_name": pipeline.pipeline_class,
        },
        toolchain={
            "framegraph": __version__,
            "mindspore": ms.__version__,
            "onnx": onnx.__version__,
            "onnx_opset": _opset(writer, onnx_graphs),
        },
        constants=recipe.constants,
        scheduler=scheduler,
        defaults=recipe.defaults,
        dtype=options.dtype,
        graphs=graphs,
        files=[writer.entry(p) for p in files],
        options={
            "frames": list(options.frames),
            "batch": options.batch,
            "formats": list(options.formats),
            "decode_chunk_sizes": sorted({g.bucket["chunk"] for g in graphs if g.name == "vae_decoder"}),
            "checked": options.check,
            "forward_chunk_size": options.forward_chunk_size,
            "attention_slice_mb": options.attention_slice_mb,
            "quantize": options.quantize,
        },
    )


def _opset(writer, onnx_graphs):
    if not onnx_graphs:
        return None
    from framegraph.export.onnx_graph import opset_version

    return opset_version(writer.stage / onnx_graphs[0].main_file)
