"""The export driver: one pipeline folder, one recipe -> one artifact folder.

:func:`export_pipeline` builds the recipe, then takes one component at a time: it reuses the previous artifact's
graphs where they still match, otherwise it exports and checks the component's graphs (graph_export.py) in this
process or, for large components, in child processes (isolation.py: the one place that decision is made). Then it
copies the pipeline's side files, writes the manifest last and commits the staging folder (artifact.py).
"""

import gc
import json
import logging
import shutil

from tqdm import tqdm

from framegraph import __version__
from framegraph.export.artifact import ArtifactWriter
from framegraph.export.graph_export import (apply_graph_options, bucket_tag, check_graphs, export_graph,
                                            graph_mode_on_cpu, planned_keys, probe_multiple)
from framegraph.export.isolation import check_in_child, export_in_children, should_isolate
from framegraph.export.lite_graphs import LITE, convert_graphs, drop_onnx, require_lite, traced_formats
from framegraph.export.onnx_graph import SharedWeights, opset_version
from framegraph.export.options import SCRATCH, validate_options
from framegraph.export.probe_check import remove_probes, uses_probes
from framegraph.runtime.manifest import Manifest

logger = logging.getLogger(__name__)

PROGRESS_LABEL = "export"  # the progress bar's name, the same under svd-export and framegraph export


def export_pipeline(pipeline, out, options, recipe_function, source_name=None, progress=None, show_progress=False):
    """Export ``pipeline`` (a PipelineFolder) into the artifact folder ``out`` following the recipe that
    ``recipe_function(pipeline, options)`` builds (registry.recipe_function finds it by pipeline class). Returns the
    artifact folder.

    ``options`` (ExportOptions) gets the pipeline's defaults filled in. ``source_name`` is the model as the user
    named it (the manifest's source; default: the folder). ``progress`` is called with each graph's label as it is
    written or reused; ``show_progress`` draws a progress bar (one tick per graph and format).
    """
    recipe = recipe_function(pipeline, options)
    ticks = recipe.graph_count(traced_formats(options.formats) + ((LITE,) if LITE in options.formats else ()))
    with tqdm(total=ticks, desc=PROGRESS_LABEL, unit="graph",
              disable=not show_progress) as bar:
        def tick(label):
            bar.set_postfix_str(label)
            bar.update(1)
            if progress:
                progress(label)

        return _export_recipe(pipeline, out, options, recipe, recipe_function, source_name, tick)


def _export_recipe(pipeline, out, options, recipe, recipe_function, source_name, progress):
    graph_mode_on_cpu()
    validate_options(options, recipe.size_multiple, pipeline.folder)
    _refuse_unprobed_formats(recipe, options)
    require_lite(options.formats)
    _check_required_files(pipeline, recipe)
    source_hash = pipeline.weights_hash([c for c, _ in recipe.components])
    writer = ArtifactWriter(out, options.fingerprint(source_hash), overwrite=options.overwrite)
    try:
        graphs = []
        for component, factories in recipe.components:
            graphs += _export_component(writer, pipeline, component, factories, recipe, recipe_function, options,
                                        progress)
        _copy_files(pipeline, recipe, writer)
        shutil.rmtree(writer.stage / SCRATCH, ignore_errors=True)
        remove_probes(writer.stage)
        manifest = _manifest(pipeline, recipe, options, graphs, source_name, source_hash, writer)
        return writer.commit(manifest)
    except BaseException:
        writer.abort()
        raise


def _refuse_unprobed_formats(recipe, options):
    """Only ONNX graphs are checked on probe sizes (probe_check.py): a large export in other formats is refused
    before any work."""
    multiple = probe_multiple(recipe, options)
    large = [f"{name}[{bucket_tag(bucket)}]" for _, factories in recipe.components for name in factories
             for bucket in recipe.buckets(name) if uses_probes(bucket, multiple)]
    if large and set(options.formats) != {"onnx"}:
        raise ValueError(f"{', '.join(large)}: graphs this large are checked on probe sizes, and only in ONNX; "
                         "export --formats onnx, or pass --full-check (hours at this size) or --no-check")


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


def _export_component(writer, pipeline, component, factories, recipe, recipe_function, options, progress):
    """The manifest entries of one component's graphs: reused from the previous artifact, or exported and checked
    here or in child processes."""
    wanted = {name: recipe.buckets(name) for name in factories}
    reused = {}
    for name in factories:
        entries = writer.reuse_component(name, planned_keys(name, wanted[name], options.formats), options.check)
        if entries is not None:
            reused[name] = entries
            for _ in entries if progress else ():
                progress(f"{name} (reused)")
    todo = [name for name in factories if name not in reused]
    # graphs that share a weights file (the UNet and its step-cache graphs) are reused all together or not at all:
    # one exported anew rewrites the file the others read
    rewritten = {recipe.specs[name].weights_folder for name in todo}
    for name in [n for n in reused if recipe.specs[n].weights_folder in rewritten]:
        logger.info("re-exporting %s: it shares its weights file with a graph exported anew", name)
        writer.unstage(reused.pop(name))
        todo.append(name)
    todo = [name for name in factories if name in todo]
    exported = []
    formats = traced_formats(options.formats)
    multiple = probe_multiple(recipe, options)
    probed = any(uses_probes(bucket, multiple) for name in todo for bucket in wanted[name])
    in_child = bool(todo) and should_isolate(pipeline, component, options.isolate, probed)
    if in_child:
        exported = export_in_children(pipeline, options, recipe_function, writer.stage, component, todo, wanted,
                                      formats, progress)
    elif todo:
        net = apply_graph_options(pipeline.build(component), options)
        exported = _export_in_process(writer, net, factories, todo, recipe, wanted, formats, options, progress)
        del net
        gc.collect()  # the MindSpore model is freed before its graphs are loaded for the check
    checked = check_graphs(writer, exported, options.dtype, options.check, check_in_child if in_child else None)
    if LITE in options.formats:
        checked += convert_graphs(writer, exported, options.dtype, options.check, progress)
        if "onnx" not in options.formats:
            checked = drop_onnx(writer, checked)
    return [e for name in factories for e in reused.get(name, [])] + checked


def _export_in_process(writer, net, factories, names, recipe, wanted, formats, options, progress):
    exported = []
    shared = {}  # weights folder -> its SharedWeights: the graphs of one group append to one file
    for name in names:
        factory, spec = factories[name], recipe.specs[name]
        weights = None
        if "onnx" in formats:
            if spec.weights_folder not in shared:
                shared[spec.weights_folder] = SharedWeights(writer.path(f"{spec.weights_folder}/weights.bin"))
            weights = shared[spec.weights_folder]
        exported += export_graph(writer, spec, lambda bucket, f=factory: f(net, bucket), wanted[name], formats,
                                 options.dtype, options.check, progress, weights=weights, quantize=options.quantize,
                                 probes=probe_multiple(recipe, options))
    return exported


def _copy_files(pipeline, recipe, writer):
    for rel in recipe.copied_files:
        source = pipeline.folder / rel
        if source.is_dir():
            shutil.copytree(source, writer.path(rel), dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy2(source, writer.path(rel))


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
            "onnx_opset": opset_version(writer.stage / onnx_graphs[0].main_file) if onnx_graphs else None,
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
            "cache_branch": options.cache_branch,
        },
    )
