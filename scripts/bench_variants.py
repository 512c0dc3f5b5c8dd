"""The exports and engines bench.py can run, as named records: one registry that bench.py (which exports and
compares) and bench_engines.py (which runs one engine per process) both read. It imports no other script.

An export is an artifact made by ``python -m framegraph.export`` from the random-weight pipeline; an engine is
diffusers (no backend, no export) or framegraph on one backend, on one export's artifact, opened with its options.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Export:
    """An artifact bench.py exports: its ``formats``, whether its UNet has a second frame bucket
    (``two_buckets``, at bench.py's ``--second-frames``), its ``--quantize`` mode, its ``memory`` options
    ("chunks" or "slices", see bench.memory_options; None: none) and whether it has the step-caching graphs
    (``step_cache``, at bench.py's ``--cache-branch``)."""

    formats: tuple[str, ...]
    two_buckets: bool = False
    quantize: str | None = None
    memory: str | None = None
    step_cache: bool = False


@dataclass(frozen=True)
class Engine:
    """One engine: diffusers where ``backend`` is None, else framegraph on ``backend`` over the artifact of
    ``export`` (a key of EXPORTS). ``low_memory`` and ``resident_buckets`` go to ``from_artifacts`` as they are;
    ``share_weights`` and ``pack_exclusive`` go to it too, where None leaves the backend's default;
    ``extra_bucket`` also opens (and runs once) the UNet bucket of the other frame count; ``decode_chunk_size`` goes
    to each pipeline call (None: the pipeline's default); ``cache_interval`` too (step caching, on an export with
    ``step_cache``); ``scheduler`` replaces the artifact's ("animatelcm": AnimateLCM-SVD's, the few-step sampler).
    ``split_guidance`` goes to ``from_artifacts`` (guidance's halves as two UNet runs).
    ``peer`` is OpenVINO's own SVD recipe instead of framegraph (scripts/bench_openvino.py): "f32" or "int8".
    ``model_cache``: graphs are opened with the backend's cache (ONNX Runtime's optimized graphs, see
    runtime/backends/ort_cache.py; OpenVINO's model cache) in a folder of the run's own, filled beforehand in a
    child process (reported as convert_s, as the peer's conversion is), so load_s is a cold process that reads
    cached graphs; None: on for the onnxruntime backend (as its default), off for openvino."""

    name: str
    backend: str | None = None
    export: str | None = None
    low_memory: bool = False
    resident_buckets: int | None = 1
    share_weights: bool | None = None
    pack_exclusive: bool | None = None
    extra_bucket: bool = False
    decode_chunk_size: int | None = None
    cache_interval: int = 1
    scheduler: str | None = None
    peer: str | None = None
    model_cache: bool | None = None
    split_guidance: bool = False

    @property
    def caches(self):
        """Whether this engine's graphs open with its backend's cache (see ``model_cache``)."""
        if self.model_cache is not None:
            return self.model_cache and self.backend in ("onnxruntime", "openvino")
        return self.backend == "onnxruntime"


EXPORTS = {
    "onnx": Export(("onnx",), two_buckets=True),
    "mindir": Export(("mindir",)),
    "onnx-int8": Export(("onnx",), quantize="int8"),
    "onnx-memory": Export(("onnx",), two_buckets=True, memory="chunks"),
    "onnx-sliced": Export(("onnx",), memory="slices"),
    "mslite": Export(("mslite",)),
    "onnx-cache": Export(("onnx",), step_cache=True),
    "onnx-int8-cache": Export(("onnx",), quantize="int8", step_cache=True),
}

ENGINES = {engine.name: engine for engine in (
    Engine("diffusers"),
    Engine("onnxruntime", backend="onnxruntime", export="onnx"),
    Engine("onnxruntime-lowmem", backend="onnxruntime", export="onnx", low_memory=True),
    Engine("onnxruntime-2buckets", backend="onnxruntime", export="onnx", extra_bucket=True,
           resident_buckets=None),
    Engine("onnxruntime-2buckets-resident1", backend="onnxruntime", export="onnx", extra_bucket=True,
           resident_buckets=1),
    Engine("onnxruntime-unshared", backend="onnxruntime", export="onnx", share_weights=False),
    Engine("onnxruntime-unshared-2buckets", backend="onnxruntime", export="onnx", extra_bucket=True,
           share_weights=False, resident_buckets=None),
    Engine("onnxruntime-packed", backend="onnxruntime", export="onnx", pack_exclusive=True),
    Engine("onnxruntime-nocache", backend="onnxruntime", export="onnx", model_cache=False),
    Engine("onnxruntime-int8", backend="onnxruntime", export="onnx-int8"),
    Engine("openvino", backend="openvino", export="onnx"),
    Engine("openvino-cached", backend="openvino", export="onnx", model_cache=True),
    Engine("onnxruntime-ffchunk", backend="onnxruntime", export="onnx-memory"),
    Engine("onnxruntime-decode1", backend="onnxruntime", export="onnx-memory", decode_chunk_size=1),
    Engine("onnxruntime-decode1-split", backend="onnxruntime", export="onnx-memory", decode_chunk_size=1,
           split_guidance=True),
    Engine("onnxruntime-sliced", backend="onnxruntime", export="onnx-sliced"),
    Engine("mindspore", backend="mindspore", export="mindir"),
    Engine("mindspore-lowmem", backend="mindspore", export="mindir", low_memory=True),
    Engine("mindspore_lite", backend="mindspore_lite", export="mslite"),
    # step caching and the few-step sampler, on one artifact: -cache1 is their uncached reference (same graphs' UNet)
    Engine("onnxruntime-cache1", backend="onnxruntime", export="onnx-cache", cache_interval=1),
    Engine("onnxruntime-cache2", backend="onnxruntime", export="onnx-cache", cache_interval=2),
    Engine("onnxruntime-cache3", backend="onnxruntime", export="onnx-cache", cache_interval=3),
    Engine("onnxruntime-int8-cache2", backend="onnxruntime", export="onnx-int8-cache", cache_interval=2),
    Engine("onnxruntime-animatelcm", backend="onnxruntime", export="onnx-cache", scheduler="animatelcm"),
    Engine("openvino-peer", peer="f32"),
    Engine("openvino-peer-int8", peer="int8"),
)}
