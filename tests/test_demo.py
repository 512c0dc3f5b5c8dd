"""The demo artifact that ships inside the package: diffusers' numbers, and a run that needs neither MindSpore nor
the source checkout's fixtures (the base install; ``.ci/base-install`` runs the same from a fresh venv)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from conftest import FIXTURES


def test_shipped_demo_artifact_equals_diffusers(svd_golden, svd_golden_call):
    from framegraph.runtime import StableVideoDiffusionPipeline
    from framegraph.runtime.demo import DEMO_ARTIFACT, DEMO_IMAGE

    pipe = StableVideoDiffusionPipeline.from_artifacts(DEMO_ARTIFACT)
    pipe.set_progress_bar_config(disable=True)
    call = dict(svd_golden_call["pipeline_call"], latents=svd_golden["pipeline.latents"],
                image_noise=svd_golden["pipeline.image_noise"], output_type="np")
    frames = pipe(Image.open(DEMO_IMAGE).convert("RGB"), **call).frames
    err = float(np.abs(frames - svd_golden["pipeline.frames"]).max())
    assert err <= 2e-3, f"shipped demo artifact: max abs error {err:.2e} against diffusers"


def test_shipped_demo_image_is_the_fixtures():
    from framegraph.runtime.demo import DEMO_IMAGE

    assert DEMO_IMAGE.read_bytes() == (FIXTURES / "svd-tiny" / "input.png").read_bytes()


def test_shipped_demo_artifact_is_current():
    """Rebuild it with scripts/make_demo_artifact.py when the manifest schema or the exported graphs change."""
    from framegraph.runtime.demo import DEMO_ARTIFACT
    from framegraph.runtime.manifest import SCHEMA_VERSION, Manifest

    manifest = Manifest.load(DEMO_ARTIFACT)
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.options["checked"] and manifest.formats() == ["onnx"]
    assert not manifest.source["model"].startswith("/"), "no path of the machine that built it"


def test_demo_runs_without_mindspore(tmp_path):
    """``framegraph demo`` and the Python API on the shipped artifact, with MindSpore made unimportable."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["mindspore"] = None  # any import of it now fails
        from framegraph.runtime.cli import main
        assert main(["demo", "--out", {str(tmp_path)!r}]) == 0
        from framegraph.runtime import StableVideoDiffusionPipeline, load_image
        from framegraph.runtime.demo import DEMO_ARTIFACT, DEMO_IMAGE
        pipe = StableVideoDiffusionPipeline.from_artifacts(DEMO_ARTIFACT)
        frames = pipe(load_image(DEMO_IMAGE), num_frames=2, num_inference_steps=2, generator=0,
                      output_type="np").frames
        print(frames.shape)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "video.mp4").stat().st_size > 0
    assert "(1, 2, 32, 32, 3)" in result.stdout


def test_base_dependencies_cover_the_onnxruntime_backend():
    """The ONNX Runtime backend imports onnx (graph metadata, streamed parts): a base dependency, not an extra."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    base = {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]}
    assert {"onnx", "onnxruntime", "numpy"} <= base
    runtime_imports = subprocess.run(
        [sys.executable, "-c", "import sys; import framegraph.runtime.backends.onnxruntime, "
         "framegraph.runtime.backends.onnx_parts, framegraph.runtime.pipelines.stable_video_diffusion; "
         "print(sorted(m.split('.')[0] for m in sys.modules))"], capture_output=True, text=True, timeout=120)
    top = set(json.loads(runtime_imports.stdout.replace("'", '"')))
    extras = {"mindspore", "torch", "diffusers", "starlette", "uvicorn"}
    assert not top & extras, f"the runtime imports {top & extras}, which the base install lacks"
