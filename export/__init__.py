"""Export of MindSpore models into static-shape MindIR and ONNX artifact folders."""
