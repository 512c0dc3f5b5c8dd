"""framegraph: ahead-of-time compiled video diffusion.

Subpackages: ``framegraph.models`` (MindSpore definitions), ``framegraph.export``
(MindSpore -> MindIR/ONNX artifacts) and ``framegraph.runtime`` (numpy + ONNX Runtime /
MindSpore / MindSpore Lite execution of those artifacts). Importing this package imports none of them.
"""

__version__ = "0.1.0"
