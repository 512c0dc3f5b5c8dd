"""Giving freed heap memory back to the operating system.

A closed ONNX Runtime session frees its buffers (weights copied into its own layouts, activations) with ``free``,
but glibc keeps freed chunks inside the process heap for reuse, so the resident size does not go down, and the
next session may not fit in the holes. ``malloc_trim(0)`` returns every free page; it is glibc-only (a no-op
elsewhere).
"""

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def trim_heap():
    """Return the heap's free pages to the operating system; True where that was possible (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
