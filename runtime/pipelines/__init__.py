"""Pipelines over compiled graphs, one file per diffusers pipeline, registered here by their kind (the manifest's
``pipeline`` field): the one registration of a pipeline kind. The engine, the HTTP server, the CLI and
``framegraph.runtime`` find the runtime class here; the export finds the kind's recipe module here (by name: the
runtime never imports the export).
"""

import importlib
from typing import NamedTuple


class PipelineKind(NamedTuple):
    module: str  # the runtime pipeline's module
    class_name: str  # its class: diffusers' pipeline class name, as model_index.json's _class_name says
    export_module: str  # the export recipe's module (its ``recipe(pipeline_folder, options)``)


PIPELINES = {
    "stable-video-diffusion": PipelineKind("framegraph.runtime.pipelines.stable_video_diffusion",
                                           "StableVideoDiffusionPipeline", "framegraph.export.stable_video_diffusion"),
    "text-to-video-sd": PipelineKind("framegraph.runtime.pipelines.text_to_video_sd", "TextToVideoSDPipeline",
                                     "framegraph.export.text_to_video_sd"),
}


def pipeline_class(kind):
    """The pipeline class of artifacts whose manifest says ``pipeline == kind``."""
    if kind not in PIPELINES:
        raise ValueError(f"no pipeline of kind {kind!r} in this framegraph (it has {', '.join(sorted(PIPELINES))}); "
                         "install the framegraph version that exported the artifact")
    entry = PIPELINES[kind]
    return getattr(importlib.import_module(entry.module), entry.class_name)


def pipeline_classes():
    """Every registered pipeline class, by kind."""
    return {kind: pipeline_class(kind) for kind in PIPELINES}
