"""Backends that run an artifact's compiled graphs: one small interface, chosen by name.

    backend = load_backend("onnxruntime", num_threads=2)
    graph = backend.open(artifact_folder, manifest.find("unet", "onnx", num_frames=14))
    out = graph(sample=..., timestep=..., encoder_hidden_states=..., added_time_ids=...)  # {"out": ndarray}

Importing this package imports no engine: each backend imports its own (onnxruntime, openvino, mindspore, mindspore_lite)
when it is constructed.
"""

from . import mindspore, mindspore_lite, onnxruntime, openvino  # noqa: F401  (registers the backends; imports no engine)
from .base import (
    Backend,
    BackendUnavailableError,
    Graph,
    GraphInputError,
    LoadedGraph,
    available_backends,
    backends_for_format,
    load_backend,
    register_backend,
)
from .mindspore import MindSporeBackend
from .mindspore_lite import MindSporeLiteBackend
from .onnxruntime import OnnxRuntimeBackend
from .openvino import OpenVinoBackend

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Graph",
    "GraphInputError",
    "LoadedGraph",
    "MindSporeBackend",
    "MindSporeLiteBackend",
    "OnnxRuntimeBackend",
    "OpenVinoBackend",
    "available_backends",
    "backends_for_format",
    "load_backend",
    "register_backend",
]
