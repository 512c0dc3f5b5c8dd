"""Export of MindSpore models into static-shape MindIR and ONNX artifact folders.

``framegraph export`` / ``svd-export`` (cli.py) picks the recipe of the pipeline's class (registry.py:
stable_video_diffusion.py, text_to_video_sd.py), and the driver (driver.py) exports its graphs (graph_export.py), in
child processes for large components (isolation.py), into a staged artifact folder (artifact.py). docs/export.md
describes every module.
"""
