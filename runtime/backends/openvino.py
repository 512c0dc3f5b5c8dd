"""OpenVINO backend: runs the manifest's "onnx" graphs (the same files ONNX Runtime runs) on OpenVINO's CPU plugin.

OpenVINO reads each ONNX graph itself (its ONNX frontend; external weights are found next to the graph) and compiles
it for the CPU. The optional extra ``framegraph[openvino]`` installs it; nothing here imports it before a backend is
built.
"""

from pathlib import Path

from ..cache import cache_root
from .base import Backend, BackendUnavailableError, LoadedGraph, check_signature, register_backend

DEVICES = {"cpu": "CPU"}
# OpenVINO's precision hints, by the names this backend takes: "f32" keeps the graph's fp32 arithmetic (the CPU
# plugin otherwise picks bf16 where the CPU has it, which moves the frames by far more than the golden tolerance)
PRECISIONS = {"f32": "f32", "bf16": "bf16"}


def import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the openvino backend needs the openvino package ({exc}); install it with pip install "
            "'framegraph[openvino]' or use backend='onnxruntime'") from exc
    return openvino


def default_cache_dir():
    """Where compiled models are cached when ``cache_dir=True``: the ``openvino`` folder of framegraph's cache
    (``$FRAMEGRAPH_CACHE``, defaulting to ~/.cache/framegraph)."""
    return cache_root() / "openvino"


@register_backend
class OpenVinoBackend(Backend):
    """``device`` "cpu" (OpenVINO's CPU plugin); ``num_threads``: its inference threads (None: OpenVINO's default);
    ``precision`` its inference precision hint, "f32" (default: the exported arithmetic) or "bf16".

    ``cache_dir``: OpenVINO's model cache. A compiled graph is stored there, keyed by OpenVINO on the graph file,
    the device and the options, and the next process that opens the same graph loads it instead of reading and
    compiling the ONNX file again (a faster cold start for a disk copy of the weights). None or False (default):
    no cache; True: ``default_cache_dir()``; a path: that folder (created if missing). OpenVINO owns what it writes
    there; framegraph never deletes it.
    """

    name = "openvino"
    format = "onnx"

    def __init__(self, device="cpu", num_threads=None, precision="f32", cache_dir=None):
        if str(device).lower() not in DEVICES:
            raise ValueError(f"device {device!r} is not supported by the openvino backend (its CPU plugin is the one "
                             "tested); use device='cpu', or backend='onnxruntime' with device='cuda' for a GPU")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
        if num_threads is not None and not (isinstance(num_threads, int) and num_threads >= 1):
            raise ValueError(f"num_threads={num_threads!r}: pass a positive thread count, or None for OpenVINO's own")
        self.ov = import_openvino()
        self.core = self.ov.Core()
        self.device = DEVICES[str(device).lower()]
        self.num_threads = num_threads
        self.precision = precision
        self.cache_dir = default_cache_dir() if cache_dir is True else Path(cache_dir) if cache_dir else None

    def __repr__(self):
        return (f"OpenVinoBackend(device={self.device!r}, num_threads={self.num_threads}, "
                f"precision={self.precision!r}, cache_dir={self.cache_dir})")

    def config(self):
        """The compile_model properties every graph of this backend is compiled with."""
        config = {"INFERENCE_PRECISION_HINT": PRECISIONS[self.precision], "PERFORMANCE_HINT": "LATENCY"}
        if self.num_threads:
            config["INFERENCE_NUM_THREADS"] = int(self.num_threads)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(self.cache_dir)
        return config

    def _load(self, path, entry, exclusive, streamed=False):
        compiled = self.core.compile_model(str(path), self.device, self.config())
        inputs = [(port.get_any_name(), _dtype(port), _shape(port)) for port in compiled.inputs]
        outputs = [(port.get_any_name(), _dtype(port), _shape(port)) for port in compiled.outputs]
        check_signature(entry, path, inputs, outputs)
        return OpenVinoGraph(compiled, [s.name for s in entry.inputs], [s.name for s in entry.outputs])


def _dtype(port):
    try:
        return str(port.get_element_type().to_dtype())
    except (RuntimeError, TypeError):  # a type numpy has no name for: kept as OpenVINO writes it, it matches nothing
        return str(port.get_element_type())


def _shape(port):
    shape = port.get_partial_shape()
    return [int(d.get_length()) if d.is_static else None for d in shape] if shape.rank.is_static else None


class OpenVinoGraph(LoadedGraph):
    """A compiled model (``native``) and its one infer request, fed the manifest's inputs by name and read back in
    the manifest's output order. ``shrink`` gives back the request's intermediate buffers after the run
    (``CompiledModel.release_memory``)."""

    def __init__(self, compiled, input_names, output_names):
        super().__init__(compiled)
        self._request = compiled.create_infer_request()
        self._inputs = list(input_names)
        self._outputs = [compiled.output(name) for name in output_names]

    def run(self, arrays, shrink=False):
        results = self._request.infer(dict(zip(self._inputs, arrays)))  # copies the outputs out of the request
        outputs = [results[port] for port in self._outputs]
        if shrink:
            self.native.release_memory()
        return outputs
