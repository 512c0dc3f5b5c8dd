"""Memory-mapped external weights shared by ONNX Runtime sessions, and which of them a session's runs read in place.

With ``share_weights`` the ONNX Runtime backend maps every external initializer of a graph file once
(:class:`MappedWeights`) and hands the same array to each session that uses it, so the frame buckets of one UNet
(which the export stores once) are held in memory once, and their clean, file-backed pages can be dropped by the
kernel under pressure instead of swapped. A mapping's pages can also be given back on purpose
(:meth:`MappedWeight.release`) and brought in again in one pass (:meth:`MappedWeight.populate`).
"""

import mmap
import sys
import threading
import weakref
from collections import namedtuple
from pathlib import Path

from ..manifest import resolve_in_folder
from .onnx_parts import constant_nodes

# Ops that read their weight initializers in place on every run while weight prepacking is off. ONNX Runtime
# copies the other weights into its own layout when it builds the session (convolutions at optimization "all",
# reshapes it constant-folds), so their mapped pages are not read again.
READ_IN_PLACE = {"Gemm", "MatMul"}
READ_IN_PLACE_UNLESS_ALL = {"Conv"}
# Ops of int8 graphs (``svd-export --quantize int8``): a session of a graph with any of them keeps weight
# prepacking on, since without it ONNX Runtime's int8 GEMM packs its weight again on every call, which costs
# step time (see docs/performance.md). Its weights are then copied into packed form, not read in place.
INTEGER_WEIGHT_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"}
# The consumer recorded for a weight read by nodes that only read constants: ONNX Runtime folds those nodes when it
# builds the session, so the weight is not read again.
FOLDED = "(constant-folded)"

# madvise(MADV_POPULATE_READ) (Linux 5.14+): fault a mapping's pages in with one call instead of one fault per page
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)

# One external initializer of a graph: its ``name``, its MappedWeight, and the op types of the nodes that read it
# (a frozenset; FOLDED for constant nodes).
MappedInitializer = namedtuple("MappedInitializer", "name weight consumers")


def reads_in_place(consumers, optimization):
    """Whether a mapped weight read by the op types ``consumers`` is read from its mapping on every run of a session
    built at ``optimization`` ("all", "extended", "basic") with weight prepacking off."""
    ops = READ_IN_PLACE | (READ_IN_PLACE_UNLESS_ALL if optimization != "all" else set())
    return bool(consumers) and set(consumers) <= ops


def share_with_session(options, mapped):
    """Hand the ``mapped`` initializers (MappedInitializer) to the session built with ``options`` (SessionOptions),
    and turn its weight prepacking off so that it reads them in place instead of keeping a packed private copy of
    every GEMM weight beside the mapped one (see docs/performance.md), unless one of them feeds an int8 op
    (INTEGER_WEIGHT_OPS). Returns whether the session prepacks."""
    for item in mapped:
        options.add_initializer(item.name, item.weight.value)
    prepacked = any(item.consumers & INTEGER_WEIGHT_OPS for item in mapped)
    if mapped and not prepacked:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return prepacked


class MappedWeights:
    """Memory-mapped external initializers, one :class:`MappedWeight` per (file, offset, dtype, shape), shared by
    the sessions that use it and unmapped when the last of them is gone."""

    def __init__(self):
        self._weights = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def initializers(self, graph_path, ort):
        """[MappedInitializer] for every external initializer of the ONNX graph at ``graph_path``."""
        import numpy as np
        import onnx
        from onnx.external_data_helper import uses_external_data

        graph_path = Path(graph_path)
        model = onnx.load(str(graph_path), load_external_data=False)
        consumers = {}
        folded = set(constant_nodes(model.graph))
        for index, node in enumerate(model.graph.node):
            for name in node.input:
                consumers.setdefault(name, set()).add(FOLDED if index in folded else node.op_type)
        out, files = [], {}
        for tensor in model.graph.initializer:
            if not uses_external_data(tensor):
                continue
            info = {e.key: e.value for e in tensor.external_data}
            location = info["location"]
            if location not in files:  # the graph file names its weight file: it must lie beside it, in the artifact
                files[location] = resolve_in_folder(graph_path.parent, location).resolve()
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
            weight = self.weight(files[location], int(info.get("offset", 0)), dtype, tensor.dims, ort)
            out.append(MappedInitializer(tensor.name, weight, frozenset(consumers.get(tensor.name, ()))))
        return out

    def weight(self, file, offset, dtype, shape, ort):
        """The MappedWeight of ``shape`` and ``dtype`` at ``offset`` in ``file``, mapped now unless it is already."""
        import numpy as np

        dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
        key = (str(file), int(offset), dtype.str, shape)
        with self._lock:
            weight = self._weights.get(key)
            if weight is None:
                weight = MappedWeight(np.memmap(file, dtype=dtype, mode="r", offset=int(offset), shape=shape), ort)
                self._weights[key] = weight
        return weight


class MappedWeight:
    """One memory-mapped weight: ``array`` (a numpy memmap) and ``value``, the OrtValue over the same memory that
    sessions are given."""

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
