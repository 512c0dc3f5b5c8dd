"""A float16 export (svd-export --dtype float16): its graphs pass the export's check, and the pipeline runs them
(float16 in the graphs, float32 numpy around them) to diffusers' float32 golden frames within float16's error."""

import json

import numpy as np
import pytest

from conftest import FIXTURES, T2V_EXPORT

META = json.loads((FIXTURES / "t2v-tiny" / "golden.json").read_text())
pytestmark = pytest.mark.xdist_group("t2v-float16")  # one export, on one worker


@pytest.fixture(scope="module")
def t2v_float16(tmp_path_factory, ms, t2v_tiny):
    from framegraph.export.options import ExportOptions
    from framegraph.export.pipeline_folder import PipelineFolder
    from framegraph.export.text_to_video_sd import export_text_to_video_sd

    out = tmp_path_factory.mktemp("float16") / "t2v-tiny"
    options = ExportOptions(formats=["onnx"], dtype="float16", **T2V_EXPORT)
    export_text_to_video_sd(PipelineFolder(t2v_tiny, dtype="float16"), out, options)
    return out


def test_the_float16_export_is_checked_and_its_graphs_take_float16(t2v_float16):
    from framegraph.runtime.manifest import Manifest

    manifest = Manifest.load(t2v_float16)
    assert manifest.dtype == "float16" and manifest.options["checked"]
    unet = manifest.find("unet", "onnx", num_frames=4, batch=2)
    assert {s.name: s.dtype for s in unet.inputs}["sample"] == "float16"
    for entry in manifest.graphs:
        assert entry.max_abs_error is not None and entry.max_abs_error <= entry.tolerance, entry.key


def test_the_float16_pipeline_equals_diffusers_float32_within_float16_error(t2v_float16, t2v_golden, caplog):
    from framegraph.runtime import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_artifacts(t2v_float16)
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level("INFO", logger="framegraph.runtime.backends.ort_attention"):
        frames = pipe(META["prompt"], **dict(META["pipeline_call"], latents=t2v_golden["pipeline.latents"])).frames
    assert frames.dtype == np.float32
    error = float(np.abs(frames - t2v_golden["pipeline.frames_ddim"]).max())
    assert error <= 1e-2, f"max abs error {error:.2e} against diffusers' float32 frames"
    # the float16 attention chains (softmax between Casts) run as MultiHeadAttention too
    assert "unet_f4_b2_h32_w32.onnx: 18 attention chains run as ONNX Runtime's MultiHeadAttention" in caplog.text
