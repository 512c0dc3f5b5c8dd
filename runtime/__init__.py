"""The framegraph runtime: numpy schedulers and pipelines over compiled graphs.

Never imports torch, diffusers, ``framegraph.models`` or ``framegraph.export``; MindSpore is imported only by
its backend, when that backend is chosen.
"""

import importlib

from framegraph.runtime.pipelines import PIPELINES

_EXPORTS = {
    "EulerDiscreteScheduler": "framegraph.runtime.schedulers",
    "DDIMScheduler": "framegraph.runtime.schedulers",
    "DPMSolverMultistepScheduler": "framegraph.runtime.schedulers",
    "export_to_video": "framegraph.runtime.video",
    "load_image": "framegraph.runtime.image",
    "Artifact": "framegraph.runtime.artifact",
    "Engine": "framegraph.runtime.engine",
    "ArtifactError": "framegraph.runtime.manifest",
}
for _entry in PIPELINES.values():  # each pipeline class and its output class
    _EXPORTS.update({_entry.class_name: _entry.module, f"{_entry.class_name}Output": _entry.module})

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'framegraph.runtime' has no attribute {name!r}")
