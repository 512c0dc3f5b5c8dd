"""ONNX Runtime's optimized form of a graph, kept on this machine so that later sessions skip the graph optimizer.

At optimization "all" ONNX Runtime rewrites a graph while it builds a session: operator fusions and, on CPU, the
blocked (NCHWc) convolutions, whose weights it reorders into new tensors. For SVD-XT's UNet at 576x1024 that rewrite
is most of the session build (docs/performance.md). Its result depends on the CPU (the block follows the vector
width) and on ONNX Runtime's version, so it is kept per machine, never in the artifact. Under the cache folder:

- ``graphs/<key>/model.onnx``: the optimized graph, with every weight held outside it turned into a graph input,
  which the session is handed as an initializer. A session of it is built with the optimizer off, reads no weight
  file and copies no weight;
- ``graphs/<key>/entry.json``: the artifact graph file it was made from, and where each of those weights comes
  from: the artifact graph's weight of the same name (found equal, byte for byte, when the entry was written), or a
  blob;
- ``blobs/<sha256>.bin``: a weight ONNX Runtime derived (a reordered convolution weight), stored by content, so the
  frame buckets of one UNet share them.

The key covers the graph's files (the manifest's sha256 and size, and the files' size and mtime), ONNX Runtime's
version, the CPU, and the session settings that change the rewrite. An entry is written once, into a temporary
folder that is then renamed into place; an entry whose weights no longer resolve (a blob missing or of another size,
a name the artifact graph lacks) is not used, and the session is built from the artifact as without the cache.
Writing an entry also removes the entries whose artifact graph file no longer exists, and the blobs no entry uses.
Everything under the folder is this module's: deleting it only costs the next session build the optimizer's time.
"""

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import uuid
from pathlib import Path

from ..cache import cache_root, hex_name

logger = logging.getLogger(__name__)

FORMAT = 1
# weights ONNX Runtime keeps inside the saved graph below this size (shape constants, scalars)
INLINE_BYTES = 1024
SAVED_WEIGHTS = "weights.bin"
# The file every weight of a cached graph names as its location. ONNX Runtime checks that it exists and is large
# enough; it never reads it, as the session is handed each of those weights (an all-zero sparse file).
PLACEHOLDER = "placeholder.bin"


def default_cache_dir():
    """``onnxruntime`` under framegraph's cache folder (``$FRAMEGRAPH_CACHE``, default ~/.cache/framegraph), or
    None where ``$FRAMEGRAPH_ORT_CACHE`` is ``off`` (no cache unless a backend is given a folder)."""
    if os.environ.get("FRAMEGRAPH_ORT_CACHE", "").strip().lower() == "off":
        return None
    return cache_root() / "onnxruntime"


@functools.lru_cache(maxsize=None)
def cpu_signature():
    """What names this machine's CPU for ONNX Runtime's kernels: architecture, model and feature flags."""
    fields = {"machine": platform.machine()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("model name", "flags", "Features") and name not in fields:
                    fields[name] = " ".join(sorted(value.split())) if name != "model name" else value.strip()
                if len(fields) == 3:
                    break
    except OSError:
        fields["processor"] = platform.processor()
    return fields


def graph_key(ort, folder, entry, settings):
    """The cache key of the manifest graph ``entry`` of the artifact ``folder`` opened with ``settings`` (a dict of
    the session settings that change the optimized graph)."""
    files = []
    for f in entry.files:
        st = os.stat(Path(folder) / f.path)
        files.append([f.path, f.sha256, f.size, st.st_size, st.st_mtime_ns])
    key = {"format": FORMAT, "onnxruntime": ort.__version__, "cpu": cpu_signature(), "files": files,
           "settings": settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


class CachedGraph:
    """A cache entry: ``model`` (the serialized optimized graph, whose external weights all name the placeholder in
    ``folder``) and ``weights`` {weight name: source}, a source being {"artifact": name in the artifact graph} or
    {"blob": path}, each with "dtype" and "shape"."""

    def __init__(self, model, weights, folder):
        self.model, self.weights, self.folder = model, weights, folder


class OptimizedGraphs:
    """The cache folder ``root`` (see the module docstring)."""

    def __init__(self, root):
        self.root = Path(root)

    def _entry(self, key):
        return self.root / "graphs" / key

    def _blob(self, digest):
        return self.root / "blobs" / f"{digest}.bin"

    def lookup(self, key, artifact_names):
        """The CachedGraph of ``key``, or None where there is none or its weights no longer resolve (a blob
        missing or of another size, or a name not in ``artifact_names``, the names of the artifact graph's mapped
        weights)."""
        entry = self._entry(key)
        try:
            import onnx
            from google.protobuf.message import DecodeError
            from onnx.external_data_helper import uses_external_data
        except ImportError:
            return None
        try:
            model = (entry / "model.onnx").read_bytes()
            listed = json.loads((entry / "entry.json").read_text())["weights"]
            external = {t.name for t in onnx.load_from_string(model).graph.initializer if uses_external_data(t)}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, DecodeError) as exc:
            logger.warning("ignoring the optimized-graph cache entry %s: %s", entry, exc)
            return None
        if external != set(listed):  # the session must be handed every weight, or it would read the placeholder
            logger.warning("ignoring the optimized-graph cache entry %s: its weight list does not match its graph",
                           entry)
            return None
        weights = {}
        for name, source in listed.items():
            if "artifact" in source:
                if source["artifact"] not in artifact_names:
                    logger.warning("ignoring the cache entry %s: it names a weight %r the graph lacks", entry,
                                   source["artifact"])
                    return None
                weights[name] = source
            else:
                blob = self._blob(source["blob"])
                if not blob.is_file() or blob.stat().st_size != source["bytes"]:
                    logger.warning("ignoring the cache entry %s: its blob %s is missing or truncated", entry, blob)
                    return None
                weights[name] = dict(source, blob=blob)
        return CachedGraph(model, weights, entry)

    def scratch(self, weight_bytes):
        """A new folder for ONNX Runtime to save an optimized graph of ``weight_bytes`` of weights into (removed by
        ``store``), or None where the onnx package (which ``store`` reads the saved graph with) is missing or the
        disk lacks twice that space (the saved weights, and the blobs made from them). Folders left by processes
        that no longer run are removed first."""
        try:
            import onnx  # noqa: F401
        except ImportError:
            return None
        tmp = self.root / "tmp"
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            self._prune_scratch(tmp)
            free = shutil.disk_usage(tmp).free
            if free < 2 * weight_bytes + (1 << 30):
                logger.warning("not caching the optimized graph: %.1f GB free under %s, %.1f GB needed", free / 1e9,
                               self.root, (2 * weight_bytes + (1 << 30)) / 1e9)
                return None
            path = tmp / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            path.mkdir()
        except OSError as exc:
            logger.warning("not caching the optimized graph under %s: %s", self.root, exc)
            return None
        return path

    @staticmethod
    def _prune_scratch(tmp):
        """Remove the scratch folders (``<pid>-<8 hex>``) under ``tmp`` whose process no longer runs."""
        for path in tmp.iterdir():
            pid, _, tag = path.name.partition("-")
            if not (pid.isdigit() and hex_name(tag, 8) and path.is_dir()):
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)
            except OSError:  # another user's process: alive
                continue

    def save_options(self, options, scratch):
        """Make the session built with ``options`` save its optimized graph into ``scratch``."""
        options.optimized_model_filepath = str(scratch / "model.onnx")
        options.log_severity_level = 3  # not the warning that the saved graph suits this machine only: it is why
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", SAVED_WEIGHTS)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(INLINE_BYTES))

    def store(self, key, scratch, source, artifact_weights):
        """Write the entry ``key`` from the optimized graph ONNX Runtime saved into ``scratch``, then remove
        ``scratch``. ``source`` is the artifact graph file; ``artifact_weights`` {name: numpy array} are its mapped
        weights: a saved weight of the same name and equal bytes is recorded as that weight, any other goes to a
        blob. Returns the bytes written to blobs, or None where it failed (logged; no entry is left)."""
        try:
            written = self._store(key, scratch, source, artifact_weights)
            self.prune()
            return written
        except (OSError, ValueError, ImportError) as exc:
            logger.warning("could not cache the optimized graph under %s (%s); later sessions run the optimizer",
                           self.root, exc)
            return None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _store(self, key, scratch, source, artifact_weights):
        import numpy as np
        import onnx
        from onnx import helper
        from onnx.external_data_helper import uses_external_data

        model = onnx.load(str(scratch / "model.onnx"), load_external_data=False)
        external = [t for t in model.graph.initializer if uses_external_data(t)]
        weights, written, largest = {}, 0, 0
        for tensor in external:
            info = {e.key: e.value for e in tensor.external_data}
            if info["location"] != SAVED_WEIGHTS:
                raise ValueError(f"the saved graph keeps {tensor.name!r} in {info['location']!r}")
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
            shape = [int(d) for d in tensor.dims]
            length = int(info["length"])
            largest = max(largest, length)
            data = np.memmap(scratch / SAVED_WEIGHTS, dtype=np.uint8, mode="r", offset=int(info.get("offset", 0)),
                             shape=(length,))
            # every weight held outside the graph names the placeholder, at offset 0: the session is handed them all
            del tensor.external_data[:]
            for name, value in (("location", PLACEHOLDER), ("offset", "0"), ("length", str(length))):
                tensor.external_data.add(key=name, value=value)
            original = artifact_weights.get(tensor.name)
            if (original is not None and original.dtype == dtype and list(original.shape) == shape
                    and np.array_equal(np.asarray(original).reshape(-1).view(np.uint8), data)):
                weights[tensor.name] = {"artifact": tensor.name, "dtype": dtype.str, "shape": shape}
                continue
            digest = hashlib.sha256(data).hexdigest()
            blob = self._blob(digest)
            if not (blob.is_file() and blob.stat().st_size == length):
                blob.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=blob.name, suffix=".tmp", dir=blob.parent)
                with os.fdopen(fd, "wb") as f:
                    f.write(memoryview(data))
                os.replace(tmp, blob)
                written += length
            weights[tensor.name] = {"blob": digest, "bytes": length, "dtype": dtype.str, "shape": shape}
        entry = self._entry(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", suffix=".tmp", dir=entry.parent))
        (tmp / "model.onnx").write_bytes(model.SerializeToString())
        (tmp / "entry.json").write_text(json.dumps({"format": FORMAT, "source": str(Path(source).resolve()),
                                                    "weights": weights}))
        with open(tmp / PLACEHOLDER, "wb") as f:  # sparse: takes no disk blocks
            f.truncate(largest)
        if entry.exists():  # an entry that did not resolve (or one another process just wrote): replaced
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process wrote the same entry in between: keep that one
            shutil.rmtree(tmp, ignore_errors=True)
        return written

    def prune(self, blob_age_s=3600):
        """Remove the entries whose artifact graph file no longer exists, then the blobs no entry names that are older
        than ``blob_age_s`` (a younger one may belong to an entry being written). Only ``<32 hex>`` entry folders
        and ``<64 hex>.bin`` blobs are touched."""
        import time

        named = set()
        graphs = self.root / "graphs"
        for entry in graphs.iterdir() if graphs.is_dir() else ():
            if not hex_name(entry.name, 32):
                continue
            try:
                record = json.loads((entry / "entry.json").read_text())
                source, weights = Path(record["source"]), record["weights"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being written, or not ours to judge: left alone
            if not source.exists():
                shutil.rmtree(entry, ignore_errors=True)
                continue
            named.update(w["blob"] for w in weights.values() if isinstance(w, dict) and "blob" in w)
        blobs = self.root / "blobs"
        now = time.time()
        for blob in blobs.glob("*.bin") if blobs.is_dir() else ():
            digest = blob.stem
            if not hex_name(digest, 64) or digest in named:
                continue
            try:
                if now - blob.stat().st_mtime > blob_age_s:
                    blob.unlink()
            except OSError:
                continue
