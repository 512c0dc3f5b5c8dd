"""A MindSpore Lite model driven through framegraph's C shim (``shim/framegraph_lite.cc``) with ctypes.

Rules: a model file is a Lite ``.ms`` (with its ``.msw`` weight file beside it when the weights passed 2 GB), run on
the CPU. Every ``predict`` is checked exactly against the model's inputs (count, dtype, shape) before Lite sees it;
inputs are copied into Lite's buffers and outputs copied out into new numpy arrays. One predict runs at a time per
model (a lock); separate models may run in parallel. The shim must have been built by ``framegraph setup-lite``
(``install.setup_lite``); this module never downloads or compiles.
"""

import contextlib
import ctypes
import logging
import os
import threading
from pathlib import Path

import numpy as np

from . import install as lite_install

logger = logging.getLogger(__name__)

# mindspore::DataType codes (include/api/data_type.h) -> numpy dtype names
DTYPES = {30: "bool", 32: "int8", 33: "int16", 34: "int32", 35: "int64", 37: "uint8", 38: "uint16", 39: "uint32",
          40: "uint64", 42: "float16", 43: "float32", 44: "float64"}
MAX_RANK = 16

_libraries = {}
_libraries_lock = threading.Lock()


class LiteUnavailableError(ImportError):
    """MindSpore Lite is not set up (or its libraries cannot be loaded) on this machine."""


class LiteError(RuntimeError):
    """MindSpore Lite refused a model or a run; the message is Lite's."""


def load_library(install=None):
    """The shim as a ctypes library, loaded once per process (``install`` defaults to ``install.find_lite()``)."""
    install = install or lite_install.find_lite()
    if install is None:
        raise LiteUnavailableError(
            "MindSpore Lite is not set up: run `framegraph setup-lite` (it downloads mindspore-lite "
            f"{lite_install.LITE_VERSION} from PyPI and builds framegraph's shim with g++), or set MSLITE_HOME to an "
            "unpacked MindSpore Lite package and run it")
    with _libraries_lock:
        lib = _libraries.get(install.shim)
        if lib is None:
            try:
                lib = ctypes.CDLL(str(install.shim))
            except OSError as exc:
                raise LiteUnavailableError(
                    f"cannot load the MindSpore Lite shim {install.shim} ({exc}): rerun `framegraph setup-lite` "
                    f"(the Lite libraries in {install.lib_dir} may have moved), or set MSLITE_HOME") from exc
            _declare(lib)
            _libraries[install.shim] = lib
    return lib


def _declare(lib):
    handle, i32, i64, size, buf = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p
    signatures = {
        "fg_lite_last_error": (ctypes.c_char_p, []),
        "fg_lite_create": (handle, [ctypes.c_char_p, i32]),
        "fg_lite_free": (None, [handle]),
        "fg_lite_num_tensors": (i32, [handle, i32]),
        "fg_lite_tensor_name": (i32, [handle, i32, i32, ctypes.c_char_p, size]),
        "fg_lite_tensor_dtype": (i32, [handle, i32, i32]),
        "fg_lite_tensor_shape": (i32, [handle, i32, i32, ctypes.POINTER(i64), i32]),
        "fg_lite_tensor_nbytes": (i64, [handle, i32, i32]),
        "fg_lite_set_input": (i32, [handle, i32, buf, size]),
        "fg_lite_predict": (i32, [handle]),
        "fg_lite_get_output": (i32, [handle, i32, buf, size]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes


_cwd_lock = threading.Lock()


@contextlib.contextmanager
def _in_folder(folder):
    """The process's working directory set to ``folder`` while a model is built: Lite 2.0 opens a model's weight
    file (``NAME.msw``, written when the weights pass 2 GB) by the bare name the ``.ms`` records, relative to the
    working directory. One build at a time; the previous directory is restored."""
    with _cwd_lock:
        previous = os.getcwd()
        os.chdir(folder)
        try:
            yield
        finally:
            os.chdir(previous)


class LiteModel:
    """A Lite model built from ``path`` on the CPU with ``num_threads`` threads (None: Lite's default)."""

    def __init__(self, path, num_threads=None, install=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no MindSpore Lite model at {self.path}: convert the ONNX graph first "
                                    "(framegraph.export.lite_convert.convert_to_lite)")
        self._lib = load_library(install)
        self._lock = threading.Lock()
        with _in_folder(self.path.parent):
            self._handle = self._lib.fg_lite_create(str(self.path.resolve()).encode(), int(num_threads or 0))
        if not self._handle:
            raise LiteError(self._error())
        self._inputs = [self._describe(0, i) for i in range(self._count(0))]
        self._outputs = [self._describe(1, i) for i in range(self._count(1))]
        logger.debug("loaded %s: inputs %s, outputs %s", self.path, self._inputs, self._outputs)

    def __repr__(self):
        return f"LiteModel({str(self.path)!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_handle", None):
            self.close()

    def inputs(self):
        """[(name, numpy dtype name, shape)] in the order ``predict`` takes them."""
        return [(name, dtype, list(shape)) for name, dtype, shape in self._inputs]

    def outputs(self):
        """[(name, numpy dtype name, shape)] in the order ``predict`` returns them."""
        return [(name, dtype, list(shape)) for name, dtype, shape in self._outputs]

    def predict(self, arrays):
        """Run the model on ``arrays`` (one per input, in ``inputs()`` order); returns the outputs as new arrays.
        Raises ValueError naming the input whose count, dtype or shape differs from the model's."""
        arrays = list(arrays)
        if len(arrays) != len(self._inputs):
            raise ValueError(f"{self.path.name} takes {len(self._inputs)} inputs "
                             f"({', '.join(n for n, _, _ in self._inputs)}), got {len(arrays)}")
        checked = []
        for array, (name, dtype, shape) in zip(arrays, self._inputs):
            array = np.asarray(array)
            if array.dtype != np.dtype(dtype):
                hint = " (Lite's converter makes int64 graph inputs int32: cast the feed)" if (
                    dtype == "int32" and array.dtype == np.int64) else ""
                raise ValueError(f"input {name!r} of {self.path.name} takes {dtype}, got {array.dtype}{hint}")
            if list(array.shape) != shape:
                raise ValueError(f"input {name!r} of {self.path.name} takes shape {shape}, got {list(array.shape)}")
            checked.append(np.ascontiguousarray(array))
        with self._lock:
            handle = self._live()
            for index, array in enumerate(checked):
                self._check(self._lib.fg_lite_set_input(handle, index, array.ctypes.data, array.nbytes))
            self._check(self._lib.fg_lite_predict(handle))
            results = []
            for index, (name, dtype, _) in enumerate(self._outputs):
                out = np.empty(self._shape(1, index), dtype=dtype)
                self._check(self._lib.fg_lite_get_output(handle, index, out.ctypes.data, out.nbytes))
                results.append(out)
        return results

    def close(self):
        """Free the Lite model (idempotent); a closed model refuses ``predict``."""
        with self._lock:
            handle, self._handle = self._handle, None
            if handle:
                self._lib.fg_lite_free(handle)

    # -- shim calls --------------------------------------------------------------------------------------------

    def _live(self):
        if not self._handle:
            raise LiteError(f"{self!r} is closed")
        return self._handle

    def _error(self):
        return self._lib.fg_lite_last_error().decode(errors="replace")

    def _check(self, status):
        if status < 0:
            raise LiteError(self._error())
        return status

    def _count(self, is_output):
        return self._check(self._lib.fg_lite_num_tensors(self._handle, is_output))

    def _shape(self, is_output, index):
        dims = (ctypes.c_int64 * MAX_RANK)()
        rank = self._check(self._lib.fg_lite_tensor_shape(self._handle, is_output, index, dims, MAX_RANK))
        if rank > MAX_RANK:
            raise LiteError(f"{self.path.name}: a tensor of rank {rank} (at most {MAX_RANK} supported)")
        return [int(d) for d in dims[:rank]]

    def _describe(self, is_output, index):
        size = self._check(self._lib.fg_lite_tensor_name(self._handle, is_output, index, None, 0)) + 1
        name = ctypes.create_string_buffer(size)
        self._check(self._lib.fg_lite_tensor_name(self._handle, is_output, index, name, size))
        code = self._check(self._lib.fg_lite_tensor_dtype(self._handle, is_output, index))
        if code not in DTYPES:
            raise LiteError(f"{self.path.name}: tensor {name.value.decode()!r} has MindSpore data type {code}, which "
                            f"framegraph does not map (known: {sorted(DTYPES)})")
        return name.value.decode(), DTYPES[code], self._shape(is_output, index)
