"""Giving freed heap memory back to the operating system.

A closed ONNX Runtime session frees its buffers (weights copied into its own layouts, activations) with ``free``,
but glibc keeps freed chunks inside the process heap for reuse, so the resident size does not go down, and the
next session may not fit in the holes. ``malloc_trim(0)`` returns every free page; it is glibc-only (a no-op
elsewhere).
"""

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_libc = None


def trim_heap():
    """Return the heap's free pages to the operating system; True where that was possible (glibc)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
        if _libc is not False and not hasattr(_libc, "malloc_trim"):
            _libc = False
    if _libc is False:
        return False
    _libc.malloc_trim(0)
    return True
