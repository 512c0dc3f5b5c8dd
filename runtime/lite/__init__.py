"""MindSpore Lite 2.0 from any Python, without Lite's Python binding (which PyPI has for CPython 3.7 only).

``install`` finds or downloads Lite's C++ libraries and compiles two small shims against them (``shim/``): a C
interface that ``native.LiteModel`` drives through ctypes, and an ONNX -> ``.ms`` converter tool. Nothing here
imports MindSpore; Lite and MindSpore 2.x cannot share a process.
"""
