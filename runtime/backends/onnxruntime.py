"""ONNX Runtime backend: runs the manifest's "onnx" graphs (external weight files are found next to the graph)."""

import logging
import mmap
import sys
import threading
import weakref
from pathlib import Path

from ..heap import trim_heap
from ..manifest import resolve_in_folder
from .base import Backend, BackendUnavailableError, check_signature, register_backend
from .onnx_parts import constant_nodes

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# ``optimization`` -> ONNX Runtime graph optimization level. "all" adds the layout transformations (blocked
# convolution layouts), whose reordered weights are private to each session; "extended" leaves them out, so that
# sessions of several frame buckets share the mapped weights (measured on two SVD-XT UNet buckets: the second
# added 3.1 GB at "all", 0.9 GB at "extended").
OPTIMIZATION_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC"}

# Ops that read their weight initializers in place on every run while weight prepacking is off. ONNX Runtime
# copies the other weights into its own layout when it builds the session (convolutions at optimization "all",
# reshapes it constant-folds), so their mapped pages are not read again.
READ_IN_PLACE = {"Gemm", "MatMul"}
READ_IN_PLACE_UNLESS_ALL = {"Conv"}
# Ops of int8 graphs (``svd-export --quantize int8``): a graph with any of them keeps weight prepacking on, since
# without it ONNX Runtime's int8 GEMM packs its weight again on every call (int8 SVD-XT UNet: 4.16 s per step
# without prepacking, 3.90 s with). Its weights are then copied into packed form, not read in place.
INTEGER_WEIGHT_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"}
FOLDED = "(constant-folded)"

# madvise(MADV_POPULATE_READ) (Linux 5.14+): fault a mapping's pages in with one call instead of one fault per page
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)

# ONNX Runtime's type strings (NodeArg.type) -> numpy dtype names, as the manifest writes them
ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}

# device -> execution providers in order of preference (ONNX Runtime falls back along the list).
DEVICE_PROVIDERS = {
    "cpu": [CPU],
    "cuda": [CUDA, CPU],
    "gpu": [CUDA, CPU],
}


def signature(args):
    """[(name, dtype, shape)] of ONNX Runtime NodeArgs (``session.get_inputs()``) for ``check_signature``; a type
    numpy has no name for (e.g. "tensor(bfloat16)") is kept as ONNX Runtime writes it, so it matches no manifest
    dtype."""
    return [(arg.name, ORT_DTYPES.get(arg.type, arg.type), list(arg.shape)) for arg in args]


def _shapeless(path):
    """Names of the graph inputs and outputs that the ONNX file at ``path`` declares without a shape, or None where
    the onnx package is not installed to read it."""
    try:
        import onnx
    except ImportError:
        return None
    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name for v in [*graph.input, *graph.output] if not v.type.tensor_type.HasField("shape")}


def graph_signature(path, entry, inputs, outputs):
    """``inputs`` and ``outputs`` (see ``signature``) with the shape of a tensor declared without one made unknown.

    ONNX Runtime reports such a tensor's shape as [], as it does a scalar's. Only where that [] disagrees with the
    manifest is the graph file read to tell them apart (without the onnx package, [] is then taken as unknown)."""
    declared = {s.name: s.shape for s in [*entry.inputs, *entry.outputs]}
    if not any(shape == [] and declared.get(name) for name, _, shape in [*inputs, *outputs]):
        return inputs, outputs
    shapeless = _shapeless(path)
    return [[(name, dtype, None if shape == [] and (shapeless is None or name in shapeless) else shape)
             for name, dtype, shape in tensors] for tensors in (inputs, outputs)]


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(
            "the onnxruntime backend needs the onnxruntime package: pip install onnxruntime (or onnxruntime-gpu)"
        ) from exc
    return onnxruntime


@register_backend
class OnnxRuntimeBackend(Backend):
    """``device`` "cpu" (default) or "cuda"; ``providers`` overrides it; ``num_threads`` sets intra-op threads;
    ``optimization`` the graph optimization level ("all", "extended", "basic"; see OPTIMIZATION_LEVELS).

    ``share_weights`` (default on for CPU): external weights are memory-mapped from the artifact's weight files
    and handed to every session as the same arrays, so the frame buckets of one UNet (which the export stores
    once) are held in memory once, and pages can be dropped by the kernel instead of swapped. Weight prepacking is
    turned off then: ONNX Runtime would keep a packed private copy of every GEMM weight per session beside the
    mapped one (measured on the SVD-XT UNet: 9.1 GB peak RSS with prepacking, 6.9 GB without, 6.4 GB unshared).
    Graphs with int8 weights keep prepacking on (see INTEGER_WEIGHT_OPS): each of their sessions holds its own
    packed weights, a quarter of the float size.

    ``pack_exclusive`` (default on): a graph opened ``exclusive`` (the UNet when one frame bucket of it is
    resident, ``resident_buckets=1``) does not share: its session loads its weights itself and packs the GEMM
    weights into ONNX Runtime's blocked layout once, instead of reading the mapped ones and packing them again on
    every call. At SVD-XT size, 128x128, 4 frames: 0.85-1.03x the step time (mostly 0.91-0.98x), the same peak
    RSS (the packed copy is the size of the mapped pages it replaces; the encoders run in parts beside it, see
    below), but a session build of 13 s instead of 4 s, and memory the kernel cannot drop under pressure as it can
    clean mapped pages. The gain shrinks at larger resolutions: the per-call packing costs in proportion to the
    weight, the product grows with the rows too. Off, the UNet reads the shared mapping like every other graph.

    A graph opened ``streamed`` (one a pipeline call runs once, or once per chunk, outside the denoising loop: the
    encoders and the VAE decoder) keeps nothing resident between its runs: its mapped weight pages are given back
    after each run and its working memory (ONNX Runtime's arena) is shrunk at the end of each run. With shared
    weights it is also cut into parts of about ``stream_part_gb`` (default 0.25) GB of the weights its runs read in
    place, run one after another, each part's pages given back before the next part runs (see onnx_parts); its
    ``native`` is then the list of the parts' sessions. At SVD-XT size the CLIP image encoder (2.5 GB) runs in 11
    parts, so what its weights add to the process while it runs falls from 2.5 GB to about 0.25 GB, on top of the
    UNet's that stay resident between calls. 0 runs every graph whole.

    ``memory_pattern`` (default on; off in low-memory artifacts, see ``low_memory_options``): ONNX Runtime's memory
    pattern lays a run's activations out ahead in one block. Off, each is allocated from the arena when it is
    produced: the SVD-XT UNet graph alone peaked at 8.25 GB instead of 9.95 GB at 256x256, 8 frames (5.53 against
    5.84 GB at 128x128, 4 frames), at up to a tenth more step time in those runs.
    """

    name = "onnxruntime"
    format = "onnx"

    low_memory_options = {"memory_pattern": False}

    def __init__(self, device="cpu", num_threads=None, providers=None, share_weights=None, pack_exclusive=True,
                 optimization="all", stream_part_gb=0.25, memory_pattern=True):
        self.ort = _import_onnxruntime()
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization={optimization!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
        self.optimization = optimization
        self.num_threads = num_threads
        self.providers = self._choose_providers(device, providers)
        self.share_weights = self.providers == [CPU] if share_weights is None else bool(share_weights)
        self.pack_exclusive = bool(pack_exclusive)
        if stream_part_gb is not None and not stream_part_gb >= 0:
            raise ValueError(f"stream_part_gb={stream_part_gb!r}: pass a size in GB, or 0 to run graphs whole")
        self.stream_part_gb = float(stream_part_gb or 0)
        self.memory_pattern = bool(memory_pattern)
        self._mapped = MappedWeights() if self.share_weights else None

    def __repr__(self):
        return f"OnnxRuntimeBackend(providers={self.providers}, num_threads={self.num_threads})"

    def _choose_providers(self, device, providers):
        available = self.ort.get_available_providers()
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

    def session_options(self):
        options = self.ort.SessionOptions()
        options.graph_optimization_level = getattr(self.ort.GraphOptimizationLevel,
                                                   OPTIMIZATION_LEVELS[self.optimization])
        if self.num_threads:
            options.intra_op_num_threads = int(self.num_threads)
        options.enable_mem_pattern = self.memory_pattern
        return options

    def shares(self, exclusive=False):
        """Whether a graph opened with ``exclusive`` reads its weights from the shared mappings."""
        return self.share_weights and not (exclusive and self.pack_exclusive)

    def _read_in_place(self, consumers):
        """Whether a weight whose consumer ops are ``consumers`` is read from its mapping on every run."""
        ops = READ_IN_PLACE | (READ_IN_PLACE_UNLESS_ALL if self.optimization != "all" else set())
        return bool(consumers) and set(consumers) <= ops

    def _session(self, model, mapped, folder=None):
        """An InferenceSession of ``model`` (a path, or serialized bytes whose external weights are in ``folder``)
        reading the ``mapped`` weights; and whether it prepacks them."""
        options = self.session_options()
        for name, weight, _ in mapped:
            options.add_initializer(name, weight.value)
        prepacked = any(ops & INTEGER_WEIGHT_OPS for _, _, ops in mapped)
        if mapped and not prepacked:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        return self.ort.InferenceSession(model, sess_options=options, providers=self.providers), prepacked

    def _parts(self, path, mapped):
        """[(serialized part, its mapped weights)] of the graph at ``path`` cut into parts of about
        ``stream_part_gb`` of the weights its runs read in place each (see onnx_parts), or None where it runs
        whole."""
        import onnx

        from .onnx_parts import plan_cuts, split_model

        if not self.stream_part_gb:
            return None
        model = onnx.load(str(path), load_external_data=False)
        # balance the weights the runs read from the mapping (not those ONNX Runtime copied at the build)
        sizes = {name: weight.array.nbytes for name, weight, ops in mapped if self._read_in_place(ops)}
        cuts = plan_cuts(model.graph, self.stream_part_gb * 1e9, sizes)
        parts = split_model(model, cuts) if cuts else None
        if not parts:
            return None
        by_name = {item[0]: item for item in mapped}
        return [(part.SerializeToString(), [by_name[t.name] for t in part.graph.initializer if t.name in by_name])
                for part in parts]

    def _load(self, path, entry, exclusive, streamed=False):
        shared = self.shares(exclusive)
        mapped = self._mapped.initializers(path, self.ort) if shared else []
        if self.share_weights and not shared:
            logger.info("%s (exclusive, pack_exclusive): the session loads its own weights and packs its GEMM weights",
                        entry.key)
        parts = self._parts(path, mapped) if streamed and mapped else None
        if parts is None:
            session, prepacked = self._session(str(path), mapped)
            stages = [(session, mapped)]
        else:
            stages = [(self._session(model, weights, folder=path.parent)[0], weights) for model, weights in parts]
            prepacked = False  # each part's session decides for itself; a streamed graph prefetches nothing anyway
            logger.info("%s runs in %d parts of %s GB of mapped weights, each given back after it runs", entry.key,
                        len(stages), " + ".join(f"{sum(w.array.nbytes for _, w, _ in ws) / 1e9:.2f}"
                                                for _, ws in stages))
        sessions = [stage for stage, _ in stages]
        # a graph run in parts takes its inputs in the first part and gives its outputs from the last
        check_signature(entry, path, *graph_signature(path, entry, signature(sessions[0].get_inputs()),
                                                      signature(sessions[-1].get_outputs())))
        want_outputs = [s.name for s in entry.outputs]
        input_names = [s.name for s in entry.inputs]

        def release():
            return sum(weight.release() for _, weight, _ in mapped)

        final = len(stages) - 1
        shrinking = self.ort.RunOptions()  # the working memory of the run leaves the process at its end
        shrinking.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

        def run(arrays, shrink=False, _keep=mapped):  # the sessions read the mapped weights: they live as long
            feeds = dict(zip(input_names, arrays))
            run_options = shrinking if streamed or shrink else None
            for number, (stage, weights) in enumerate(stages):
                names = want_outputs if number == final else [stage.get_outputs()[0].name]
                outputs = stage.run(names, feeds, run_options)
                if streamed:  # this part's pages leave before the next part's come in
                    for _, weight, _ in weights:
                        weight.release()
                if number < final:
                    feeds = {sessions[number + 1].get_inputs()[0].name: outputs[0]}
            if run_options is not None:
                trim_heap()
            return outputs

        run.shrinks = True

        # a prepacking session reads its packed copies, not the mapped weights; a streamed graph gives its pages
        # back as it goes
        read_in_place = [] if prepacked or streamed else [
            weight for _, weight, ops in mapped if self._read_in_place(ops)]

        def prefetch():
            return sum(weight.populate() for weight in read_in_place)

        if mapped:
            run.release, run.prefetch = release, prefetch
            # Building the session read every weight, but the ones ONNX Runtime copied into its own layout
            # (convolution weights at optimization="all") are never read again: drop them from this process now.
            # Pages the runs do read come back from the page cache on first use.
            logger.info("released %.2f GB of mapped weight pages read while building %s", release() / 1e9,
                        entry.key)
        trim_heap()  # what the graph optimizer allocated and freed while building the session
        return run, sessions[0] if len(sessions) == 1 else sessions


class MappedWeights:
    """Memory-mapped external initializers, one OrtValue per (file, offset, dtype, shape), shared by the sessions
    that use it and unmapped when the last of them is gone."""

    def __init__(self):
        self._weights = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def initializers(self, graph_path, ort):
        """[(name, _Mapped, consumer op types)] for every external initializer of the ONNX graph at
        ``graph_path``."""
        import numpy as np
        import onnx
        from onnx.external_data_helper import uses_external_data

        graph_path = Path(graph_path)
        model = onnx.load(str(graph_path), load_external_data=False)
        consumers = {}
        # nodes that only read constants are folded by ONNX Runtime when it builds the session, their weights are
        # not read again (the SVD UNet's frame position embedding MLP: 0.4 GB)
        folded = set(constant_nodes(model.graph))
        for index, node in enumerate(model.graph.node):
            for name in node.input:
                consumers.setdefault(name, set()).add(FOLDED if index in folded else node.op_type)
        out = []
        with self._lock:
            for tensor in model.graph.initializer:
                if not uses_external_data(tensor):
                    continue
                info = {e.key: e.value for e in tensor.external_data}
                # the graph file names its weight file: it must lie beside it, inside the artifact
                file = resolve_in_folder(graph_path.parent, info["location"]).resolve()
                offset = int(info.get("offset", 0))
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
                shape = tuple(int(d) for d in tensor.dims)
                key = (str(file), offset, dtype.str, shape)
                weight = self._weights.get(key)
                if weight is None:
                    weight = _Mapped(np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape), ort)
                    self._weights[key] = weight
                out.append((tensor.name, weight, frozenset(consumers.get(tensor.name, ()))))
        return out


class _Mapped:
    def __init__(self, array, ort):
        self.array = array
        self.value = ort.OrtValue.ortvalue_from_numpy(array)

    def _advise(self, advice):
        """``madvise(advice)`` over this mapping; its size in bytes, or 0 where the call is not available or the
        kernel refuses the advice."""
        mapping = getattr(self.array, "_mmap", None)
        if advice is None or mapping is None or not hasattr(mapping, "madvise"):
            return 0
        try:
            mapping.madvise(advice)
        except OSError:  # e.g. MADV_POPULATE_READ before Linux 5.14 (EINVAL)
            return 0
        return len(mapping)

    def release(self):
        """Drop the resident pages of this mapping (clean, file-backed: they are re-read on access); returns the
        mapping's size in bytes, or 0 where madvise is not available."""
        return self._advise(getattr(mmap, "MADV_DONTNEED", None))

    def populate(self):
        """Bring this mapping's pages in now (from the page cache, or the artifact when they are not cached) with
        one madvise instead of a page fault per 4 KiB page on first use; returns the mapping's size in bytes, or 0
        where that is not available (other systems, Linux before 5.14: the pages then come in on first use)."""
        return self._advise(MADV_POPULATE_READ if sys.platform.startswith("linux") else None)
