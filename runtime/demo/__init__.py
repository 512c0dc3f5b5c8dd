"""The demo that ships with the package: a tiny SVD artifact (ONNX, exported from the diffusers-saved fixture by
``scripts/make_demo_artifact.py``) and its input image, so that ``framegraph demo`` runs on the base install."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO_ARTIFACT = HERE / "svd-tiny"
DEMO_IMAGE = HERE / "input.png"
DEMO_SIZE = 32
DEMO_FRAMES = (2, 4)
DEMO_STEPS = 10
