"""The text-to-video (ModelScope / VideoFusion) recipe: text encoder, UNet per frame bucket, per-frame VAE
decoder per slice size."""

import logging

from framegraph.export.driver import export_pipeline
from framegraph.export.options import validate_options
from framegraph.export.recipe import Recipe, whole_model
from framegraph.export.specs import latent_constants
from framegraph.export.step_cache import add_step_cache
from framegraph.export import text_to_video_sd_specs as specs
from framegraph.runtime.pipelines.text_to_video_sd import CALL_DEFAULTS, PIPELINE_KIND

logger = logging.getLogger(__name__)

COPIED_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer")


def _vae_decoder(net, bucket):
    from framegraph.models.autoencoder_kl import VaeDecoderGraph

    return VaeDecoderGraph(net)


def recipe(pipeline, options):
    """The Recipe of ``pipeline`` (a PipelineFolder); fills the ``None`` fields of ``options`` with the pipeline's
    defaults."""
    configs = {c: pipeline.config(c) for c in ("text_encoder", "vae", "unet")}
    dims = specs.dims(configs["text_encoder"], configs["vae"], configs["unet"])
    default_size = int(configs["unet"].get("sample_size", 32)) * dims["vae_scale_factor"]
    options.frames = [CALL_DEFAULTS["num_frames"]] if options.frames is None else options.frames
    options.height = default_size if options.height is None else options.height
    options.width = default_size if options.width is None else options.width
    validate_options(options, 1, pipeline.folder)  # counts and formats; the size multiple is checked on export
    default_frames = CALL_DEFAULTS["num_frames"]
    recipe = Recipe(
        kind=PIPELINE_KIND,
        components=[
            ("text_encoder", {"text_encoder": whole_model}),
            ("vae", {"vae_decoder": _vae_decoder}),
            ("unet", {"unet": whole_model}),
        ],
        specs=specs.graph_specs(dims),
        plan=specs.buckets(options.frames, options.height, options.width, options.batch, options.decode_chunk_sizes),
        constants={
            **latent_constants(configs["vae"], dims),
            "max_length": dims["max_length"],
        },
        defaults={
            "height": options.height,
            "width": options.width,
            **CALL_DEFAULTS,
            "num_frames": default_frames if default_frames in options.frames else options.frames[0],
        },
        copied_files=COPIED_FILES,
        required_files=("tokenizer",),
        size_multiple=dims["vae_scale_factor"] * 2 ** dims["unet_downsamples"],
    )
    if options.cache_branch is not None:
        add_step_cache(recipe, configs["unet"], options.cache_branch, dims["vae_scale_factor"])
    return recipe


def export_text_to_video_sd(pipeline, out, options, source_name=None, progress=None):
    """Export ``pipeline`` (a PipelineFolder of a text-to-video model) to the artifact folder ``out``."""
    return export_pipeline(pipeline, out, options, recipe, source_name, progress)
