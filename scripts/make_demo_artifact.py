"""Rebuild the demo artifact that ships inside the package (``runtime/demo``), so that ``framegraph demo`` runs on
the base install (ONNX Runtime, no MindSpore).

    python scripts/make_demo_artifact.py   # needs the export extra: pip install -e '.[export]'

It exports the tiny SVD fixture (``tests/fixtures/svd-tiny/pipeline``, saved by diffusers) to ONNX with the
default numerical check against the MindSpore model, and copies the fixture's input image beside it.
``tests/test_demo.py`` checks the shipped artifact against diffusers' golden frames.
"""

import logging
import os
import shutil
import sys
from pathlib import Path

from framegraph.export.cli import main as export_main
from framegraph.runtime.demo import DEMO_ARTIFACT, DEMO_FRAMES, DEMO_IMAGE, DEMO_SIZE

ROOT = Path(__file__).resolve().parent.parent

FIXTURE = ROOT / "tests" / "fixtures" / "svd-tiny"

logger = logging.getLogger("make_demo_artifact")


def main():
    frames = ",".join(str(f) for f in DEMO_FRAMES)
    if DEMO_ARTIFACT.exists():
        shutil.rmtree(DEMO_ARTIFACT)  # the package's own demo folder, rebuilt from scratch
    os.chdir(ROOT)  # the manifest records the source folder as given: a path relative to the checkout
    code = export_main([str(FIXTURE.relative_to(ROOT) / "pipeline"), "--out", str(DEMO_ARTIFACT), "--frames", frames,
                        "--height", str(DEMO_SIZE), "--width", str(DEMO_SIZE), "--formats", "onnx"])
    if code:
        return code
    shutil.copyfile(FIXTURE / "input.png", DEMO_IMAGE)
    size = sum(p.stat().st_size for p in DEMO_ARTIFACT.rglob("*") if p.is_file())
    logger.info("demo artifact: %s (%.1f MB), image %s", DEMO_ARTIFACT, size / 1e6, DEMO_IMAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
