"""ONNX Runtime backend: runs the manifest's "onnx" graphs (external weight files are found next to the graph).

One module per job: ort_providers (device -> execution providers, session options), ort_weights (memory-mapped
weights shared by sessions), onnx_parts (cutting a graph into parts), ort_graph (running the sessions of a graph,
whole or in parts); this one holds the backend, which opens a graph with them and checks it against the manifest.
"""

import logging
from pathlib import Path

from ..heap import trim_heap
from .base import Backend, check_signature, register_backend
from .onnx_parts import split_file
from .ort_attention import fused_model
from .ort_cache import OptimizedGraphs, default_cache_dir, graph_key
from .ort_graph import OnnxRuntimeGraph
from .ort_providers import (CPU, OPTIMIZATION_LEVELS, choose_providers, import_onnxruntime, merge_provider_options,
                            session_options, use_shared_arena)
from .ort_weights import INTEGER_WEIGHT_OPS, MappedInitializer, MappedWeights, reads_in_place, share_with_session

logger = logging.getLogger(__name__)

# ONNX Runtime's type strings (NodeArg.type) -> numpy dtype names, as the manifest writes them
ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
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


@register_backend
class OnnxRuntimeBackend(Backend):
    """``device`` "cpu" (default) or "cuda"; ``providers`` overrides it; ``num_threads`` sets intra-op threads;
    ``optimization`` the graph optimization level ("all", "extended", "basic"; see OPTIMIZATION_LEVELS);
    ``provider_options`` {provider name: {option: value}} with ONNX Runtime's own option names, e.g.
    {"CUDAExecutionProvider": {"device_id": "1"}} (the rest stay at ONNX Runtime's defaults).

    ``share_weights`` (default on for CPU): external weights are memory-mapped from the artifact's weight files
    and handed to every session as the same arrays (see ort_weights), so the frame buckets of one UNet (which the
    export stores once) are held in memory once, and pages can be dropped by the kernel instead of swapped. Weight
    prepacking is turned off then: ONNX Runtime would keep a packed private copy of every GEMM weight per session
    beside the mapped one. Graphs with int8 weights keep prepacking on (see INTEGER_WEIGHT_OPS): each of their
    sessions holds its own packed weights, a quarter of the float size. See docs/performance.md for the peak
    memory of each.

    ``pack_exclusive`` (default off): a graph opened ``exclusive`` (the UNet when one frame bucket of it is
    resident, ``resident_buckets=1``) does not share: its session loads its weights itself and packs the GEMM
    weights into ONNX Runtime's blocked layout once, instead of reading the mapped ones and packing them again on
    every call. The packed copy takes the place of the mapped pages, so the peak memory stays about the same; the
    price is a longer session build (no cached build, see ``cache_dir``), and memory the kernel cannot drop under
    pressure as it can clean mapped pages. The step time it saves is a few percent at small sizes and none at
    576x1024 (see docs/performance.md); it suits a long-lived process at small sizes. Off, the UNet reads the
    shared mapping like every other graph.

    A graph opened ``streamed`` (one a pipeline call runs once, or once per chunk, outside the denoising loop: the
    encoders and the VAE decoder) keeps nothing resident between its runs: its mapped weight pages are given back
    after each run and its working memory (ONNX Runtime's arena) is shrunk at the end of each run. With shared
    weights it is also cut into parts of about ``stream_part_gb`` (default 0.25) GB of the weights its runs read in
    place, run one after another, each part's pages given back before the next part runs (see onnx_parts and
    ort_graph); its ``native`` is then the list of the parts' sessions. What its weights add to the process while
    it runs is then about one part instead of all of them, on top of the UNet's that stay resident between calls
    (see docs/performance.md). 0 runs every graph whole.

    ``memory_pattern``: ONNX Runtime's memory pattern lays a run's activations out ahead in one block, allocated
    at the second run beside the chunks the first run left in the arena. The default (None) keeps it for the
    graphs with an arena of their own and leaves it off for those on the shared arena (the UNet graphs), whose
    activations are the largest: there the block cost a second full-size working memory and the second step's
    time, for no faster later steps (see docs/performance.md). It is off for every graph on CUDA, where it took
    about twice the GPU memory for the same step (docs/performance.md, section "CUDA"). True or False sets it for
    every graph; low-memory artifacts turn it off (``low_memory_options``).

    ``memory_reuse`` (default None: off on CPU): ONNX Runtime's allocation planner gives an activation the buffer
    of an earlier, dead activation of the same size. That buffer stays allocated from the earlier one's last use
    to the later one's first, across every layer in between: in a UNet, the buffers of the first level are held
    while the deeper levels run, for the same-sized activations of the way back up, so a run holds several times
    its live activations. Off, every activation is taken from the arena when it is produced and given back at its
    last use, and what the run holds is what is live (SVD-XT at 576x1024: see docs/performance.md). On CUDA it
    stays at ONNX Runtime's default (on): not measured there. True or False sets it for every graph.

    ``shared_arena`` (default on for CPU): the graphs that are not streamed (the UNet graphs, which a call runs in
    turn: the cached-step pair ``unet_deep`` and ``unet_shallow``, or several frame buckets) allocate their working
    memory from one process-wide arena, so what stays resident between their runs is the largest one's, not the
    sum of all. A streamed graph keeps its own arena, shrunk after each run.

    ``fuse_attention`` (default on): a graph run whole (not in parts) gets its attention chains replaced by ONNX
    Runtime's MultiHeadAttention kernel in the session (see ort_attention; the artifact's file is not changed),
    which never holds the scores: at 576x1024 and 25 frames one first-level attention takes 0.69x the time and half
    the working memory (docs/performance.md). Off, the session runs the graph as exported.

    ``cache_dir`` (default True, as None: ``ort_cache.default_cache_dir()``, under ``$FRAMEGRAPH_CACHE``, none
    where ``$FRAMEGRAPH_ORT_CACHE=off``; a path: that folder; False: no cache; CPU only): a graph run whole on
    shared weights is built once with ONNX Runtime's optimizer and its optimized form is kept there for this
    machine (see ort_cache); later sessions of it are built from that with the optimizer off, and read every weight,
    the reordered convolution weights included, from mappings (clean pages, given back between calls like the
    others). The first build of a graph also writes the optimized graph (about its weights' size, temporarily) and
    the derived weights: about 2.8 GB for SVD-XT's UNet, shared by its frame buckets. Graphs with int8 weights
    (which prepack) are not cached.
    """

    name = "onnxruntime"
    format = "onnx"

    low_memory_options = {"memory_pattern": False}

    def __init__(self, device="cpu", num_threads=None, providers=None, share_weights=None, pack_exclusive=False,
                 optimization="all", stream_part_gb=0.25, memory_pattern=None, shared_arena=None,
                 fuse_attention=True, provider_options=None, cache_dir=True, memory_reuse=None):
        self.ort = import_onnxruntime()
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization={optimization!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
        self.optimization = optimization
        self.num_threads = num_threads
        self.providers = choose_providers(self.ort, device, providers)
        self.provider_options = merge_provider_options(self.providers, provider_options)
        self.share_weights = self.providers == [CPU] if share_weights is None else bool(share_weights)
        self.pack_exclusive = bool(pack_exclusive)
        if stream_part_gb is not None and not stream_part_gb >= 0:
            raise ValueError(f"stream_part_gb={stream_part_gb!r}: pass a size in GB, or 0 to run graphs whole")
        self.stream_part_gb = float(stream_part_gb or 0)
        self.memory_pattern = None if memory_pattern is None else bool(memory_pattern)
        self.memory_reuse = None if memory_reuse is None else bool(memory_reuse)
        self.shared_arena = self.providers == [CPU] if shared_arena is None else bool(shared_arena)
        self.fuse_attention = bool(fuse_attention)
        self._mapped = MappedWeights() if self.share_weights else None
        folder = default_cache_dir() if cache_dir is None or cache_dir is True else cache_dir or None
        self._cache = (OptimizedGraphs(folder) if folder is not None and self.share_weights
                       and self.providers == [CPU] else None)

    def __repr__(self):
        return f"OnnxRuntimeBackend(providers={self.providers}, num_threads={self.num_threads})"

    def session_options(self, shared_arena=False):
        """The SessionOptions a session of this backend starts from (``shared_arena``: one that allocates from the
        process-wide arena)."""
        if self.memory_pattern is not None:
            pattern = self.memory_pattern
        else:
            pattern = not shared_arena and self.providers == [CPU]
        reuse = self.providers != [CPU] if self.memory_reuse is None else self.memory_reuse
        return session_options(self.ort, self.optimization, self.num_threads, pattern, reuse)

    def shares(self, exclusive=False):
        """Whether a graph opened with ``exclusive`` reads its weights from the shared mappings."""
        return self.share_weights and not (exclusive and self.pack_exclusive)

    def _session(self, model, mapped, folder=None, shared_arena=False, optimized=False, save_to=None):
        """An InferenceSession of ``model`` (a path, or serialized bytes whose external weights are in ``folder``)
        reading the ``mapped`` weights, allocating from the process-wide arena if ``shared_arena``; and whether it
        prepacks them. ``optimized``: the model is already optimized (from the cache), so the optimizer stays off;
        ``save_to``: a cache scratch folder the session saves its optimized graph into."""
        options = self.session_options(shared_arena)
        if optimized:
            options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if save_to is not None:
            self._cache.save_options(options, save_to)
        if shared_arena:
            use_shared_arena(self.ort, options)
        prepacked = share_with_session(options, mapped)
        if folder is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        return self.ort.InferenceSession(model, sess_options=options, providers=self.providers,
                                         provider_options=self.provider_options), prepacked

    def _parts(self, path, mapped):
        """[(serialized part, its MappedInitializers)] of the graph at ``path`` cut into parts of about
        ``stream_part_gb`` of the weights its runs read in place each (see onnx_parts), or None where it runs
        whole."""
        if not self.stream_part_gb:
            return None
        # balance the weights the runs read from the mapping (not those ONNX Runtime copied at the build)
        sizes = {item.name: item.weight.array.nbytes for item in mapped
                 if reads_in_place(item.consumers, self.optimization)}
        parts = split_file(path, self.stream_part_gb * 1e9, sizes)
        if not parts:
            return None
        by_name = {item.name: item for item in mapped}
        return [(part.SerializeToString(), [by_name[t.name] for t in part.graph.initializer if t.name in by_name])
                for part in parts]

    def _whole(self, path, entry, mapped, streamed):
        """(session, the MappedInitializers it reads, whether it prepacks, whether it runs a cached graph) for the
        graph at ``path`` run whole: built from the optimized-graph cache where it holds this graph, else from the
        artifact (attention fused), saving the optimized graph into the cache where one is used."""
        arena = self.shared_arena and not streamed
        cache = self._cache if mapped and not any(item.consumers & INTEGER_WEIGHT_OPS for item in mapped) else None
        key = None
        if cache is not None:
            settings = {"optimization": self.optimization, "fuse_attention": self.fuse_attention,
                        "providers": self.providers}
            folder = path.parents[len(Path(entry.main_file).parts) - 1]
            key = graph_key(self.ort, folder, entry, settings)
            by_name = {item.name: item for item in mapped}
            hit = cache.lookup(key, by_name)
            if hit is not None:
                weights = [by_name[source["artifact"]]._replace(name=name) if "artifact" in source else
                           MappedInitializer(name, self._mapped.weight(source["blob"], 0, source["dtype"],
                                                                       source["shape"], self.ort), frozenset())
                           for name, source in hit.weights.items()]
                session, prepacked = self._session(hit.model, weights, folder=hit.folder, shared_arena=arena,
                                                   optimized=True)
                logger.info("%s: built from its optimized form cached under %s", entry.key, cache.root)
                return session, weights, prepacked, True
        fused = fused_model(path) if self.fuse_attention else None
        if fused is not None:
            mapped = [item for item in mapped if item.name in fused[1]]
        scratch = cache.scratch(sum(item.weight.array.nbytes for item in mapped)) if cache is not None else None
        session, prepacked = self._session(str(path) if fused is None else fused[0], mapped,
                                           folder=None if fused is None else path.parent, shared_arena=arena,
                                           save_to=scratch)
        if scratch is not None:
            written = cache.store(key, scratch, path, {item.name: item.weight.array for item in mapped})
            if written is not None:
                logger.info("%s: optimized graph cached under %s (%.2f GB of derived weights written)", entry.key,
                            cache.root, written / 1e9)
        return session, mapped, prepacked, False

    def _load(self, path, entry, exclusive, streamed=False):
        shared = self.shares(exclusive)
        mapped = self._mapped.initializers(path, self.ort) if shared else []
        if self.share_weights and not shared:
            logger.info("%s (exclusive, pack_exclusive): the session loads its own weights and packs its GEMM weights",
                        entry.key)
        parts = self._parts(path, mapped) if streamed and mapped else None
        cached = False
        if parts is None:
            session, mapped, prepacked, cached = self._whole(path, entry, mapped, streamed)
            stages = [(session, mapped)]
        else:
            stages = [(self._session(model, weights, folder=path.parent)[0], weights) for model, weights in parts]
            prepacked = False  # each part's session decides for itself; a streamed graph prefetches nothing anyway
            logger.info("%s runs in %d parts of %s GB of mapped weights, each given back after it runs", entry.key,
                        len(stages), " + ".join(f"{sum(item.weight.array.nbytes for item in ws) / 1e9:.2f}"
                                                for _, ws in stages))
        # a graph run in parts takes its inputs in the first part and gives its outputs from the last
        check_signature(entry, path, *graph_signature(path, entry, signature(stages[0][0].get_inputs()),
                                                      signature(stages[-1][0].get_outputs())))
        # a prepacking session reads its packed copies, not the mapped weights; a streamed graph gives its pages
        # back as it goes; a session of a cached graph reads every weight it is handed on every run
        read_in_place = [] if prepacked or streamed else [
            item.weight for item in mapped if cached or reads_in_place(item.consumers, self.optimization)]
        graph = OnnxRuntimeGraph(self.ort, stages, [s.name for s in entry.inputs], [s.name for s in entry.outputs],
                                 mapped=mapped, read_in_place=read_in_place, streamed=streamed)
        if mapped and not cached:  # a session of a cached graph is built without reading its weights
            # Building the session read every weight, but the ones ONNX Runtime copied into its own layout
            # (convolution weights at optimization="all") are never read again: drop them from this process now.
            # Pages the runs do read come back from the page cache on first use.
            logger.info("released %.2f GB of mapped weight pages read while building %s", graph.release_memory() / 1e9,
                        entry.key)
        trim_heap()  # what the graph optimizer allocated and freed while building the session
        return graph
