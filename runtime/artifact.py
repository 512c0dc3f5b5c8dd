"""An opened artifact folder: manifest checked, files verified, graphs opened lazily on one backend."""

import gc
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from framegraph.runtime.heap import trim_heap
from framegraph.runtime.manifest import ArtifactError, Manifest, verify_files

logger = logging.getLogger(__name__)

# Graphs a pipeline call runs once (the VAE decoder once per chunk) outside the denoising loop: they are opened
# ``streamed`` (see Backend.open), so that nothing of them stays resident between their runs.
RUN_ONCE = {"image_encoder", "vae_encoder", "text_encoder", "vae_decoder"}


class Artifact:
    """``Artifact(path, pipeline_kind, backend)``; ``graph(name, **bucket)`` returns a callable graph.

    Graphs are opened on first use and stay open. With ``low_memory=True`` only the graph last asked for stays
    open: asking for another closes it first (the compiled analogue of diffusers' model CPU offload). The peak
    memory is then that of the largest graph instead of the sum, at the cost of reopening the graphs on each call;
    the backend also gets its ``low_memory_options`` (ONNX Runtime: no memory pattern).
    ``resident_buckets`` (default 1) is how many frame buckets (``num_frames``) of one graph stay open: asking for
    another closes the one used least recently first. A process serving several frame counts then holds one
    UNet's memory, and pays a reopen (a few seconds at SVD-XT size) when the frame count changes; None keeps them
    all open. Other buckets (e.g. the VAE decoder's chunk sizes, used together in one call) are not limited.
    With ``resident_buckets=1`` a frame-bucket graph is opened ``exclusive`` (see ``Backend.open``): its weights
    have no other session to be shared with (ONNX Runtime's ``pack_exclusive``, off by default, packs them then).
    The encoders and the VAE decoder (RUN_ONCE) are opened ``streamed``.
    ``split_guidance=True`` has the pipelines run classifier-free guidance's unconditional and conditional halves
    as two runs of the UNet graph at the call's own batch (the one exported for calls without guidance) instead of
    one run at twice the batch: the same numbers, half the UNet's working memory, the same arithmetic.
    """

    def __init__(self, path, pipeline_kind, backend="onnxruntime", verify=True, low_memory=False,
                 resident_buckets=1, split_guidance=False, **backend_options):
        from framegraph.runtime.backends import load_backend

        self.path = Path(path)
        if not self.path.is_dir():
            raise ArtifactError(f"{self.path} is not a folder; pass the --out folder written by svd-export")
        self.manifest = Manifest.load(self.path)
        if self.manifest.pipeline != pipeline_kind:
            raise ArtifactError(
                f"{self.path} holds a {self.manifest.pipeline!r} artifact, not {pipeline_kind!r}; "
                "load it with the matching pipeline class"
            )
        self.backend = load_backend(backend, low_memory=low_memory, **backend_options)
        self.format = self.backend.format
        if self.format not in self.manifest.formats():
            raise ArtifactError(
                f"{self.path} has no {self.format} graphs (it has {self.manifest.formats()}), which backend="
                f"{self.backend.name!r} needs; re-export with --formats {self.format}"
            )
        files = {f.path: f for f in self.manifest.files}
        for g in self.manifest.graphs:
            if g.format == self.format:
                files.update({f.path: f for f in g.files})
        verify_files(self.path, files.values(), verify)
        if resident_buckets is not None and int(resident_buckets) < 1:
            raise ValueError(f"resident_buckets={resident_buckets!r}: pass a count of at least 1, or None for no limit")
        self._graphs = OrderedDict()  # key -> graph, least recently used first
        self._names = {}  # key -> graph name
        self._lock = threading.Lock()
        self.low_memory = bool(low_memory)
        self.resident_buckets = None if resident_buckets is None else int(resident_buckets)
        self.split_guidance = bool(split_guidance)

    @property
    def constants(self):
        return self.manifest.constants

    @property
    def defaults(self):
        return self.manifest.defaults

    def buckets(self, name, key):
        return self.manifest.bucket_values(name, self.format, key)

    def has(self, name, **bucket):
        try:
            self.manifest.find(name, self.format, **bucket)
            return True
        except ArtifactError:
            return False

    def graph(self, name, **bucket):
        entry = self.manifest.find(name, self.format, **bucket)
        with self._lock:
            if entry.key not in self._graphs:
                if self.low_memory and self._graphs:
                    self.close()
                limited = "num_frames" in entry.bucket
                if limited:
                    self._make_room(entry.name)
                logger.info("opening %s", entry.key)
                # one bucket open at a time: no other session of these weights to share them with
                exclusive = limited and self.resident_buckets == 1
                graph = self.backend.open(self.path, entry, exclusive=exclusive, streamed=entry.name in RUN_ONCE)
                graph.float32_io = True  # the pipelines compute in float32 numpy whatever the graphs' dtype
                self._graphs[entry.key] = graph
                self._names[entry.key] = entry.name
            self._graphs.move_to_end(entry.key)
            return self._graphs[entry.key]

    def _make_room(self, name):
        """Close the least recently used frame buckets of graph ``name`` until one more fits in
        ``resident_buckets``."""
        if self.resident_buckets is None:
            return
        same = [key for key in self._graphs if self._names[key] == name]
        closing = same[:max(0, len(same) - self.resident_buckets + 1)]
        if not closing:
            return
        logger.info("closing %s to open another %s bucket (resident_buckets=%d)", ", ".join(closing), name,
                    self.resident_buckets)
        for key in closing:
            del self._graphs[key]
            del self._names[key]
        gc.collect()
        trim_heap()  # the closed session's memory leaves the process before the next one is built

    def open_graphs(self):
        """Keys of the graphs open now."""
        return sorted(self._graphs)

    def close(self):
        """Close every open graph (a graph still running in another thread finishes first)."""
        if self._graphs:
            logger.info("closing %s", ", ".join(sorted(self._graphs)))
        self._graphs.clear()
        self._names.clear()
        gc.collect()
        trim_heap()
