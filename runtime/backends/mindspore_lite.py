"""MindSpore Lite backend: runs the manifest's "mslite" graphs (``.ms`` files converted at export from the checked
ONNX graphs) on the MindSpore Lite runtime, through framegraph's small C++ shim (runtime/lite/).

The Lite runtime is set up once with ``framegraph setup-lite`` (an existing Lite package named by ``MSLITE_HOME``, or
the PyPI wheel's libraries fetched into a cache); no Lite Python binding is needed, and this backend imports neither
mindspore nor onnxruntime, so an edge box needs only numpy and the Lite libraries.
"""

import logging

import numpy as np

from ..manifest import ArtifactError
from .base import Backend, BackendUnavailableError, LoadedGraph, check_signature, register_backend

logger = logging.getLogger(__name__)

DEVICES = ("cpu",)


def _native():
    try:
        from ..lite import native
    except ImportError as exc:  # numpy is the only requirement; the shim is checked when a model is opened
        raise BackendUnavailableError(f"the mindspore_lite backend cannot load its native layer ({exc})") from exc
    return native


@register_backend
class MindSporeLiteBackend(Backend):
    """``device`` "cpu" (the Lite CPU runtime); ``num_threads``: Lite's CPU thread count (default: Lite's own)."""

    name = "mindspore_lite"
    format = "mslite"

    def __init__(self, device="cpu", num_threads=None):
        if str(device).lower() not in DEVICES:
            raise ValueError(f"device {device!r} is not supported by the mindspore_lite backend (its runtime here is "
                             "MindSpore Lite's CPU runtime); use device='cpu', or backend='mindspore' for Ascend/GPU")
        self.num_threads = num_threads
        self.native = _native()
        try:
            self.native.load_library()
        except self.native.LiteUnavailableError as exc:
            raise BackendUnavailableError(str(exc)) from exc

    def __repr__(self):
        return f"MindSporeLiteBackend(num_threads={self.num_threads})"

    def _load(self, path, entry, exclusive, streamed=False):
        model = self.native.LiteModel(str(path), num_threads=self.num_threads)
        inputs, outputs = model.inputs(), model.outputs()
        names = [name for name, _, _ in inputs]
        want = [s.name for s in entry.inputs]
        if sorted(names) != sorted(want):
            model.close()
            raise ArtifactError(f"{path} has inputs {names} but the manifest entry {entry.key} lists {want}; "
                                "re-export the artifact with --formats mslite")
        order = [want.index(name) for name in names]
        # Lite's converter turns int64 graph inputs into int32: such an input is checked as the manifest's int64
        # and cast when fed (token ids fit in int32)
        narrowed = [dtype == "int32" and entry.inputs[index].dtype == "int64"
                    for (_, dtype, _), index in zip(inputs, order)]
        inputs = [(name, "int64" if narrow else dtype, shape) for (name, dtype, shape), narrow in zip(inputs, narrowed)]
        if len(outputs) == len(entry.outputs):  # read by position, as predict returns them
            outputs = [(spec.name, dtype, shape) for spec, (_, dtype, shape) in zip(entry.outputs, outputs)]
        try:
            check_signature(entry, path, inputs, outputs)
        except ArtifactError:
            model.close()
            raise
        return MindSporeLiteGraph(model, order, narrowed)


class MindSporeLiteGraph(LoadedGraph):
    """A Lite model (``native``) whose n-th input is fed the manifest's ``order[n]``-th input, cast to int32 where
    ``narrowed[n]``; it maps no weights and keeps no memory that ``shrink`` could give back."""

    def __init__(self, model, order, narrowed):
        super().__init__(model)
        self._order, self._narrowed = list(order), list(narrowed)

    def run(self, arrays, shrink=False):
        return self.native.predict([arrays[index].astype(np.int32) if narrow else arrays[index]
                                    for index, narrow in zip(self._order, self._narrowed)])
