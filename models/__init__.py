"""MindSpore definitions of the diffusers / transformers components framegraph compiles.

Module attribute paths equal the checkpoint keys, so loading is a checked 1:1 copy (see ``loading``).
"""
