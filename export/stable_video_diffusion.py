"""The Stable Video Diffusion recipe: image encoder, VAE encoder, UNet per frame bucket, temporal VAE decoder per
decode chunk."""

import json
import logging

from framegraph.export.driver import export_pipeline
from framegraph.export.options import validate_options
from framegraph.export.recipe import Recipe, whole_model
from framegraph.export.specs import latent_constants
from framegraph.export.step_cache import add_step_cache
from framegraph.export import stable_video_diffusion_specs as specs
from framegraph.runtime.pipelines.stable_video_diffusion import CALL_DEFAULTS, PIPELINE_KIND

logger = logging.getLogger(__name__)

COPIED_FILES = ("model_index.json", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json")
# diffusers' StableVideoDiffusionPipeline.__call__ size defaults.
DEFAULT_HEIGHT, DEFAULT_WIDTH = 576, 1024
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _vae_encoder(net, bucket):
    from framegraph.models.autoencoder_kl_temporal_decoder import VaeEncoderGraph

    return VaeEncoderGraph(net)


def _vae_decoder(net, bucket):
    from framegraph.models.autoencoder_kl_temporal_decoder import VaeDecoderGraph

    return VaeDecoderGraph(net, bucket["chunk"])


def recipe(pipeline, options):
    """The Recipe of ``pipeline`` (a PipelineFolder); fills the ``None`` fields of ``options`` with the pipeline's
    defaults."""
    configs = {c: pipeline.config(c) for c in ("image_encoder", "vae", "unet")}
    dims = specs.dims(configs["image_encoder"], configs["vae"], configs["unet"])
    unet_frames = int(configs["unet"].get("num_frames", 25))
    options.frames = [unet_frames] if options.frames is None else options.frames
    options.height = DEFAULT_HEIGHT if options.height is None else options.height
    options.width = DEFAULT_WIDTH if options.width is None else options.width
    validate_options(options, 1, pipeline.folder)  # counts and formats; the size multiple is checked on export
    preprocessor = {}
    path = pipeline.folder / "feature_extractor" / "preprocessor_config.json"
    if path.is_file():
        preprocessor = json.loads(path.read_text(encoding="utf-8"))
    recipe = Recipe(
        kind=PIPELINE_KIND,
        components=[
            ("image_encoder", {"image_encoder": whole_model}),
            ("vae", {"vae_encoder": _vae_encoder, "vae_decoder": _vae_decoder}),
            ("unet", {"unet": whole_model}),
        ],
        specs=specs.graph_specs(dims),
        plan=specs.buckets(options.frames, options.height, options.width, options.batch, options.decode_chunk_sizes),
        constants={
            **latent_constants(configs["vae"], dims),
            "clip_image_size": dims["clip_image_size"],
            "image_mean": preprocessor.get("image_mean", CLIP_MEAN),
            "image_std": preprocessor.get("image_std", CLIP_STD),
            "unet_num_frames": unet_frames,
        },
        defaults={
            "height": options.height,
            "width": options.width,
            "num_frames": unet_frames if unet_frames in options.frames else options.frames[0],
            **CALL_DEFAULTS,
        },
        copied_files=COPIED_FILES,
        size_multiple=dims["vae_scale_factor"] * 2 ** dims["unet_downsamples"],
    )
    if options.cache_branch is not None:
        add_step_cache(recipe, configs["unet"], options.cache_branch, dims["vae_scale_factor"])
    return recipe


def export_stable_video_diffusion(pipeline, out, options, source_name=None, progress=None):
    """Export ``pipeline`` (a PipelineFolder of an SVD model) to the artifact folder ``out``."""
    return export_pipeline(pipeline, out, options, recipe, source_name, progress)
