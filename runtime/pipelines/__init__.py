"""Pipelines over compiled graphs, one file per diffusers pipeline, registered here by their kind (the manifest's
``pipeline`` field). The engine, the HTTP server, the CLI and ``framegraph.runtime`` find them in ``PIPELINES``."""

import importlib

# kind -> (module, class)
PIPELINES = {
    "stable-video-diffusion": ("framegraph.runtime.pipelines.stable_video_diffusion", "StableVideoDiffusionPipeline"),
    "text-to-video-sd": ("framegraph.runtime.pipelines.text_to_video_sd", "TextToVideoSDPipeline"),
}


def pipeline_class(kind):
    """The pipeline class of artifacts whose manifest says ``pipeline == kind``."""
    if kind not in PIPELINES:
        raise ValueError(f"no pipeline of kind {kind!r} in this framegraph (it has {', '.join(sorted(PIPELINES))}); "
                         "install the framegraph version that exported the artifact")
    module, name = PIPELINES[kind]
    return getattr(importlib.import_module(module), name)


def pipeline_classes():
    """Every registered pipeline class, by kind."""
    return {kind: pipeline_class(kind) for kind in PIPELINES}
