"""MindSpore Lite backend: runs the manifest's "mindir" graphs with ``mindspore_lite.Model`` (CPU or Ascend).

No mindspore-lite wheel installs on Python 3.11 from PyPI (only 2.0.0 for CPython 3.7 exists there); install the
wheel for your Python from mindspore.cn. Constructing this backend without it raises BackendUnavailableError.
"""

import logging

from ..manifest import ArtifactError
from .base import Backend, BackendUnavailableError, LoadedGraph, check_signature, register_backend
from .mindspore import DEVICE_TARGETS as MINDSPORE_TARGETS

logger = logging.getLogger(__name__)

# device argument -> MindSpore Lite context target: MindSpore's device_target, in lower case
DEVICE_TARGETS = {device: target.lower() for device, target in MINDSPORE_TARGETS.items()}


def _import_mindspore_lite():
    try:
        import mindspore_lite
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the mindspore_lite backend needs the mindspore_lite package, which cannot be imported ({exc}). PyPI only "
            "has mindspore-lite 2.0.0 for CPython 3.7, so no wheel installs on this Python: install the wheel for your "
            "Python and device from https://www.mindspore.cn/lite, or use backend='mindspore' (same MindIR graphs) "
            "or backend='onnxruntime'"
        ) from exc
    return mindspore_lite


def lite_signature(tensors, names):
    """[(name, dtype, shape)] of MindSpore Lite tensors (``model.get_inputs()``) for ``check_signature``, named
    ``names`` (the manifest's names in the order the tensors are fed or read). A tensor's ``dtype``
    (``DataType.FLOAT32``) reads as its numpy name; a tensor that does not say its dtype or shape leaves it
    unchecked, and a negative dimension is dynamic."""
    out = []
    for tensor, name in zip(tensors, names):
        dtype = getattr(tensor, "dtype", None)
        if dtype is not None:
            dtype = getattr(dtype, "name", str(dtype)).rsplit(".", 1)[-1].lower()
            dtype = None if dtype in ("unknown", "undefined", "none") else dtype
        shape = getattr(tensor, "shape", None)
        out.append((name, dtype, None if shape is None else list(shape)))
    return out


@register_backend
class MindSporeLiteBackend(Backend):
    """``device`` "cpu" (default) or "ascend"; ``num_threads`` sets the CPU thread count; ``device_id`` the card."""

    name = "mindspore_lite"
    format = "mindir"

    def __init__(self, device="cpu", num_threads=None, device_id=None):
        key = str(device).lower()
        if key not in DEVICE_TARGETS:
            raise ValueError(
                f"device {device!r} is not supported by the mindspore_lite backend; use one of {sorted(DEVICE_TARGETS)}"
            )
        self.target = DEVICE_TARGETS[key]
        self.num_threads = num_threads
        self.device_id = device_id
        self.mslite = _import_mindspore_lite()

    def __repr__(self):
        return f"MindSporeLiteBackend(target={self.target!r}, num_threads={self.num_threads})"

    def context(self):
        context = self.mslite.Context()
        context.target = [self.target]
        if self.num_threads:
            context.cpu.thread_num = int(self.num_threads)
        if self.device_id is not None and self.target != "cpu":
            getattr(context, self.target).device_id = int(self.device_id)
        return context

    def _load(self, path, entry, exclusive, streamed=False):
        model = self.mslite.Model()
        model.build_from_file(str(path), self.mslite.ModelType.MINDIR, self.context())
        tensors = model.get_inputs()
        names = [t.name for t in tensors]
        want = [s.name for s in entry.inputs]
        if sorted(names) != sorted(want):
            # MindIR input names may be positional (e.g. "x", "x1"); fall back to the manifest's order then.
            if len(names) != len(want):
                raise ArtifactError(
                    f"{path} has {len(names)} inputs {names} but the manifest entry {entry.key} lists {want}; "
                    "re-export the artifact"
                )
            logger.info("%s: MindIR input names %s differ from the manifest's %s; feeding by position", path, names,
                        want)
            order = list(range(len(want)))
        else:
            order = [want.index(n) for n in names]
        inputs = lite_signature(tensors, [want[index] for index in order])
        get_outputs = getattr(model, "get_outputs", None)  # the outputs are read by position, as predict gives them
        outputs = None if get_outputs is None else get_outputs()
        if outputs is not None:
            labels = [s.name for s in entry.outputs] if len(outputs) == len(entry.outputs) else [
                getattr(t, "name", f"output {i}") for i, t in enumerate(outputs)]
            outputs = lite_signature(outputs, labels)
        check_signature(entry, path, inputs, outputs)
        return MindSporeLiteGraph(model, order)


class MindSporeLiteGraph(LoadedGraph):
    """A MindSpore Lite Model (``native``) whose n-th input tensor is fed the manifest's ``order[n]``-th input; it
    maps no weights and keeps no memory that ``shrink`` could give back."""

    def __init__(self, model, order):
        super().__init__(model)
        self._order = list(order)

    def run(self, arrays, shrink=False):
        inputs = self.native.get_inputs()
        for tensor, index in zip(inputs, self._order):
            tensor.set_data_from_numpy(arrays[index])
        return [o.get_data_to_numpy() for o in self.native.predict(inputs)]
