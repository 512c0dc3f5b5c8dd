"""MindSpore backend: runs the manifest's "mindir" graphs with ``mindspore.load`` + ``nn.GraphCell`` in GRAPH_MODE.

``mindspore.export`` writes ``NAME.mindir``, or for big graphs ``NAME_graph.mindir`` plus ``NAME_variables/``; the
manifest's first file is the graph file either way and MindSpore finds the variables folder beside it.
MindSpore is imported when this backend is constructed, never at package import.
"""

import logging

from .base import Backend, BackendUnavailableError, register_backend

logger = logging.getLogger(__name__)

# device argument -> MindSpore device_target
DEVICE_TARGETS = {
    "cpu": "CPU",
    "gpu": "GPU",
    "cuda": "GPU",
    "ascend": "Ascend",
    "npu": "Ascend",
}


def _import_mindspore():
    try:
        import mindspore
    except ImportError as exc:
        raise BackendUnavailableError(
            "the mindspore backend needs MindSpore: pip install -e '.[mindspore]' (mindspore==2.10.0, numpy<2), "
            "or use backend='onnxruntime' with the artifact's onnx graphs"
        ) from exc
    return mindspore


def _device_target(device):
    try:
        return DEVICE_TARGETS[str(device).lower()]
    except KeyError:
        raise ValueError(
            f"device {device!r} is not supported by the mindspore backend; use one of {sorted(DEVICE_TARGETS)}"
        ) from None


@register_backend
class MindSporeBackend(Backend):
    """``device`` "cpu" (default), "gpu" or "ascend"; ``device_id`` picks the card; ``num_threads`` CPU op threads.

    MindSpore's device and mode are process-wide: constructing this backend sets GRAPH_MODE and the device.
    """

    name = "mindspore"
    format = "mindir"

    def __init__(self, device="cpu", num_threads=None, device_id=None):
        self.device_target = _device_target(device)
        self.ms = _import_mindspore()
        self.num_threads = num_threads
        self.ms.set_context(mode=self.ms.GRAPH_MODE)
        if self._device_already(device_id):
            logger.debug("MindSpore already runs on %s in this process", self.device_target)
        else:
            self._set_device(device_id)
        if num_threads and self.device_target == "CPU":
            self._set_cpu_threads(int(num_threads))

    def _device_already(self, device_id):
        """MindSpore fixes its device once kernels have run; reusing the same device is fine."""
        try:
            same_target = self.ms.get_context("device_target") == self.device_target
            same_id = device_id is None or int(self.ms.get_context("device_id")) == int(device_id)
        except (RuntimeError, ValueError):
            return False
        return same_target and same_id

    def _set_device(self, device_id):
        try:
            if device_id is None:
                self.ms.set_device(self.device_target)
            else:
                self.ms.set_device(self.device_target, int(device_id))
        except RuntimeError as exc:
            raise BackendUnavailableError(
                f"MindSpore cannot use device_target={self.device_target!r} here ({str(exc).splitlines()[0]}); install "
                "the MindSpore build for that device or use device='cpu'"
            ) from exc

    def __repr__(self):
        return f"MindSporeBackend(device_target={self.device_target!r}, num_threads={self.num_threads})"

    def _set_cpu_threads(self, num_threads):
        try:
            from mindspore.device_context.cpu.op_tuning import threads_num

            threads_num(num_threads)
        except (ImportError, RuntimeError, ValueError) as exc:
            logger.warning("could not set MindSpore CPU threads to %d (%s); using its default", num_threads, exc)

    def _load(self, path, entry, exclusive, streamed=False):
        ms = self.ms
        cell = ms.nn.GraphCell(ms.load(str(path)))

        def run(arrays):
            outputs = cell(*[ms.Tensor(a) for a in arrays])
            if not isinstance(outputs, (tuple, list)):
                outputs = [outputs]
            return [o.asnumpy() for o in outputs]

        return run, cell
