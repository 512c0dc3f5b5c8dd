"""An opened artifact folder: manifest checked, files verified, graphs opened lazily on one backend."""

import gc
import logging
import threading
from pathlib import Path

from framegraph.runtime.manifest import ArtifactError, Manifest, verify_files

logger = logging.getLogger(__name__)

class Artifact:
    """``Artifact(path, pipeline_kind, backend)``; ``graph(name, **bucket)`` returns a callable graph.

    Graphs are opened on first use and stay open. With ``low_memory=True`` only the graph last asked for stays
    open: asking for another closes it first (the compiled analogue of diffusers' model CPU offload). The peak
    memory is then that of the largest graph instead of the sum, at the cost of reopening the graphs on each call.
    """

    def __init__(self, path, pipeline_kind, backend="onnxruntime", verify=True, low_memory=False,
                 **backend_options):
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
        self.backend = load_backend(backend, **backend_options)
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
        verify_files(self.path, files.values(), check_hash=verify)
        self._graphs = {}
        self._lock = threading.Lock()
        self.low_memory = bool(low_memory)

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
                logger.info("opening %s", entry.key)
                self._graphs[entry.key] = self.backend.open(self.path, entry)
            return self._graphs[entry.key]

    def open_graphs(self):
        """Keys of the graphs open now."""
        return sorted(self._graphs)

    def close(self):
        """Close every open graph (a graph still running in another thread finishes first)."""
        if self._graphs:
            logger.info("closing %s", ", ".join(sorted(self._graphs)))
        self._graphs.clear()
        gc.collect()
