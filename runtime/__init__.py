"""The framegraph runtime: numpy schedulers and pipelines over compiled graphs.

Never imports torch, diffusers, ``framegraph.models`` or ``framegraph.export``; MindSpore is imported only by
its backend, when that backend is chosen.
"""
