"""ONNX Runtime's side of a backend's options: the execution providers for a device, and the session options that
every session of the backend starts from."""

import logging

from .base import BackendUnavailableError

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# device -> execution providers in order of preference (ONNX Runtime falls back along the list).
DEVICE_PROVIDERS = {
    "cpu": [CPU],
    "cuda": [CUDA, CPU],
    "gpu": [CUDA, CPU],
}

# ``optimization`` -> ONNX Runtime graph optimization level. "all" adds the layout transformations (blocked
# convolution layouts), whose reordered weights are private to each session; "extended" leaves them out, so that
# sessions of several frame buckets share the mapped weights (see docs/performance.md).
OPTIMIZATION_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC"}


def import_onnxruntime():
    """The onnxruntime module, or BackendUnavailableError saying what to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(
            "the onnxruntime backend needs the onnxruntime package: pip install onnxruntime (or onnxruntime-gpu)"
        ) from exc
    return onnxruntime


def choose_providers(ort, device, providers=None):
    """The execution providers of ``device`` (or the ``providers`` asked for) that this onnxruntime build has, in
    order of preference; the missing ones are named in a warning. BackendUnavailableError where none is left."""
    available = ort.get_available_providers()
    if providers is None:
        key = str(device).lower()
        if key not in DEVICE_PROVIDERS:
            raise ValueError(
                f"device {device!r} is not supported by the onnxruntime backend; use one of "
                f"{sorted(DEVICE_PROVIDERS)} or pass providers=[...]"
            )
        wanted = DEVICE_PROVIDERS[key]
    else:
        wanted = [providers] if isinstance(providers, str) else list(providers)
    chosen = [p for p in wanted if p in available]
    dropped = [p for p in wanted if p not in available]
    if dropped:
        logger.warning(
            "execution providers %s are not available in this onnxruntime build (it has %s); using %s",
            dropped, available, chosen,
        )
    if not chosen:
        raise BackendUnavailableError(
            f"none of the execution providers {wanted} is available in this onnxruntime (it has {available}); "
            "install the matching onnxruntime package (e.g. onnxruntime-gpu for CUDA) or use device='cpu'"
        )
    return chosen


def merge_provider_options(providers, provider_options=None):
    """The options of each of ``providers`` (a list of dicts in their order, as InferenceSession takes them) from
    ``provider_options`` ({provider: {option: value}}; values as strings). A provider named in ``provider_options``
    but not used is refused (a misspelt name would otherwise be ignored)."""
    provider_options = dict(provider_options or {})
    unused = sorted(set(provider_options) - set(providers))
    if unused:
        raise ValueError(f"provider_options names {unused}, which this backend does not use (it uses {providers}); "
                         "name one of those, or choose the device or providers that use it")
    return [{k: str(v) for k, v in provider_options.get(p, {}).items()} for p in providers]


_SHARED_ARENA = []  # the memory info of the process-wide CPU arena, once registered


def shared_cpu_arena(ort):
    """Register (once per process) the CPU arena that sessions built with ``use_shared_arena`` allocate from
    instead of each keeping an arena of its own: two graphs run in turn then hold the larger of their working
    memories between runs, not the sum."""
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # ONNX Runtime's own defaults
        _SHARED_ARENA.append(info)
    return _SHARED_ARENA[0]


def use_shared_arena(ort, options):
    """Make the session built with ``options`` (SessionOptions) allocate from the process-wide CPU arena."""
    shared_cpu_arena(ort)
    options.add_session_config_entry("session.use_env_allocators", "1")


def session_options(ort, optimization, num_threads, memory_pattern, memory_reuse=True):
    """A new SessionOptions with the graph ``optimization`` level (a key of OPTIMIZATION_LEVELS), ``num_threads``
    intra-op threads (None: ONNX Runtime's default), the memory pattern and the planner's buffer reuse on or off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization])
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    options.enable_mem_pattern = bool(memory_pattern)
    options.enable_mem_reuse = bool(memory_reuse)
    return options
