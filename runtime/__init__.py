"""The framegraph runtime: numpy schedulers and pipelines over compiled graphs.

Never imports torch, diffusers, ``framegraph.models`` or ``framegraph.export``; MindSpore is imported only by
its backend, when that backend is chosen.
"""

import importlib

_EXPORTS = {
    "StableVideoDiffusionPipeline": "framegraph.runtime.pipelines.stable_video_diffusion",
    "StableVideoDiffusionPipelineOutput": "framegraph.runtime.pipelines.stable_video_diffusion",
    "TextToVideoSDPipeline": "framegraph.runtime.pipelines.text_to_video_synth",
    "TextToVideoSDPipelineOutput": "framegraph.runtime.pipelines.text_to_video_synth",
    "EulerDiscreteScheduler": "framegraph.runtime.schedulers",
    "DDIMScheduler": "framegraph.runtime.schedulers",
    "DPMSolverMultistepScheduler": "framegraph.runtime.schedulers",
    "export_to_video": "framegraph.runtime.video",
    "load_image": "framegraph.runtime.image",
    "Artifact": "framegraph.runtime.artifact",
    "Engine": "framegraph.runtime.engine",
    "ArtifactError": "framegraph.runtime.manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'framegraph.runtime' has no attribute {name!r}")
