"""Export of a Stable Video Diffusion pipeline folder into an artifact folder."""

import dataclasses
import gc
import json
import logging
import shutil

from framegraph import __version__
from framegraph.export.artifact import ArtifactWriter
from framegraph.export.exporter import check_exported, export_component, planned_keys
from framegraph.export.svd_specs import svd_buckets, svd_dims, svd_graph_specs
from framegraph.runtime.manifest import Manifest

logger = logging.getLogger(__name__)

PIPELINE_KIND = "stable-video-diffusion"
COPIED_FILES = ("model_index.json", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json")
# diffusers' StableVideoDiffusionPipeline.__call__ defaults.
CALL_DEFAULTS = {
    "num_inference_steps": 25,
    "min_guidance_scale": 1.0,
    "max_guidance_scale": 3.0,
    "fps": 7,
    "motion_bucket_id": 127,
    "noise_aug_strength": 0.02,
    "decode_chunk_size": None,
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclasses.dataclass
class SvdExportOptions:
    frames: list = None  # default: unet.config.num_frames
    height: int = 576
    width: int = 1024
    batch: int = 1
    formats: tuple = ("onnx", "mindir")
    dtype: str = "float32"
    decode_chunk_sizes: list = None  # default: the frame count (one chunk)
    check: bool = True

    def fingerprint(self, source_hash):
        fields = dataclasses.asdict(self)
        fields.pop("check")
        return json.dumps({"framegraph": __version__, "source": source_hash, **fields}, sort_keys=True)


def validate(options, dims, folder):
    multiple = dims["vae_scale_factor"] * 2 ** dims["unet_downsamples"]
    for name in ("height", "width"):
        value = getattr(options, name)
        if value <= 0 or value % multiple:
            raise ValueError(f"--{name} {value} must be a positive multiple of {multiple} for {folder}")
    if not options.frames or any(f < 1 for f in options.frames):
        raise ValueError(f"--frames must be positive integers, got {options.frames}")
    if options.decode_chunk_sizes and any(n < 1 for n in options.decode_chunk_sizes):
        raise ValueError(f"--decode-chunk-sizes must be positive integers, got {options.decode_chunk_sizes}")
    if options.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {options.batch}")
    unknown = set(options.formats) - {"onnx", "mindir"}
    if unknown or not options.formats:
        raise ValueError(f"--formats must be a subset of onnx,mindir; got {','.join(options.formats)}")
    if options.dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16, got {options.dtype}")


def export_svd(pipeline, out, options, source_name=None, progress=None):
    """Export ``pipeline`` (a PipelineFolder of an SVD model) to the artifact folder ``out``."""
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    configs = {c: pipeline.config(c) for c in ("image_encoder", "vae", "unet")}
    dims = svd_dims(configs["image_encoder"], configs["vae"], configs["unet"])
    if not options.frames:
        options.frames = [int(configs["unet"].get("num_frames", 25))]
    validate(options, dims, pipeline.folder)
    specs = svd_graph_specs(dims)
    plan = svd_buckets(options.frames, options.height, options.width, options.batch, options.decode_chunk_sizes)
    source_hash = pipeline.weights_hash(["image_encoder", "vae", "unet"])
    writer = ArtifactWriter(out, options.fingerprint(source_hash))
    try:
        graphs = []
        for component, graph_names in (("image_encoder", ["image_encoder"]), ("vae", ["vae_encoder", "vae_decoder"]),
                                       ("unet", ["unet"])):
            graphs += _export_component_graphs(writer, pipeline, component, graph_names, specs, plan, options,
                                               progress)
        for rel in COPIED_FILES:
            if (pipeline.folder / rel).is_file():
                shutil.copy2(pipeline.folder / rel, writer.path(rel))
        manifest = _manifest(pipeline, configs, dims, options, graphs, source_name, source_hash, writer)
        return writer.commit(manifest)
    except BaseException:
        writer.abort()
        raise


def _export_component_graphs(writer, pipeline, component, graph_names, specs, plan, options, progress):
    wanted = {name: [b for n, b in plan if n == name] for name in graph_names}
    reused = {}
    for name in graph_names:
        entries = writer.reuse_component(name, planned_keys(name, wanted[name], options.formats))
        if entries is not None:
            reused[name] = entries
            if progress:
                for _ in entries:
                    progress(f"{name} (reused)")
    if len(reused) == len(graph_names):
        return [e for name in graph_names for e in reused[name]]
    exported = _export_built(writer, pipeline.build(component), graph_names, reused, specs, wanted, options, progress)
    gc.collect()  # the MindSpore model is freed before its graphs are loaded for the check
    return [e for name in graph_names for e in reused.get(name, [])] + check_exported(
        writer, exported, options.dtype, options.check)


def _export_built(writer, net, graph_names, reused, specs, wanted, options, progress):
    from framegraph.models.autoencoder_kl_temporal_decoder import VaeDecoderGraph, VaeEncoderGraph

    cells = {
        "image_encoder": lambda bucket: net,
        "unet": lambda bucket: net,
        "vae_encoder": lambda bucket: VaeEncoderGraph(net),
        "vae_decoder": lambda bucket: VaeDecoderGraph(net, bucket["chunk"]),
    }
    exported = []
    for name in graph_names:
        if name not in reused:
            exported += export_component(writer, specs[name], cells[name], wanted[name], options.formats,
                                         options.dtype, options.check, progress)
    return exported


def _manifest(pipeline, configs, dims, options, graphs, source_name, source_hash, writer):
    import mindspore as ms
    import onnx

    preprocessor = {}
    path = pipeline.folder / "feature_extractor" / "preprocessor_config.json"
    if path.is_file():
        preprocessor = json.loads(path.read_text(encoding="utf-8"))
    scheduler_path = pipeline.folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_path.read_text(encoding="utf-8"))
    num_frames = int(configs["unet"].get("num_frames", options.frames[0]))
    onnx_graphs = [g for g in graphs if g.format == "onnx"]
    return Manifest(
        pipeline=PIPELINE_KIND,
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
        constants={
            "vae_scaling_factor": float(configs["vae"].get("scaling_factor", 0.18215)),
            "latent_channels": dims["latent_channels"],
            "vae_scale_factor": dims["vae_scale_factor"],
            "unet_in_channels": dims["unet_in_channels"],
            "clip_image_size": dims["clip_image_size"],
            "image_mean": preprocessor.get("image_mean", CLIP_MEAN),
            "image_std": preprocessor.get("image_std", CLIP_STD),
            "unet_num_frames": num_frames,
        },
        scheduler=scheduler,
        defaults={
            "height": options.height,
            "width": options.width,
            "num_frames": num_frames if num_frames in options.frames else options.frames[0],
            **CALL_DEFAULTS,
        },
        dtype=options.dtype,
        graphs=graphs,
        files=[writer.entry(writer.stage / rel) for rel in COPIED_FILES if (writer.stage / rel).is_file()],
        options={
            "frames": list(options.frames),
            "batch": options.batch,
            "formats": list(options.formats),
            "decode_chunk_sizes": sorted({g.bucket["chunk"] for g in graphs if g.name == "vae_decoder"}),
            "checked": options.check,
        },
    )


def _opset(writer, onnx_graphs):
    if not onnx_graphs:
        return None
    from framegraph.export.onnx_graph import opset_version

    return opset_version(writer.stage / onnx_graphs[0].main_file)
