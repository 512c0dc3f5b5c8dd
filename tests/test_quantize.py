"""Opt-in int8 weights (``svd-export --quantize int8``) on the tiny text-to-video model."""

import json

import numpy as np
import pytest

from conftest import FIXTURES, T2V_EXPORT
from framegraph.export.onnx_fusions import NORM_SCALE_PREFIX
from framegraph.export.quantize import FLOAT_LINEAR
from framegraph.runtime.manifest import Manifest


@pytest.fixture(scope="module")
def int8_artifact(ms, t2v_tiny, tmp_path_factory):
    from framegraph.export.pipeline_folder import PipelineFolder
    from framegraph.export.options import ExportOptions
    from framegraph.export.text_to_video_sd import export_text_to_video_sd

    options = ExportOptions(formats=("onnx",), quantize="int8", isolate="never", **T2V_EXPORT)
    return export_text_to_video_sd(PipelineFolder(t2v_tiny), tmp_path_factory.mktemp("int8") / "t2v-int8", options)


def test_int8_unet_uses_standard_integer_ops_and_smaller_weights(int8_artifact, t2v_artifact):
    import onnx

    m = Manifest.load(int8_artifact)
    assert m.options["quantize"] == "int8"
    for entry in m.graphs:
        model = onnx.load(str(int8_artifact / entry.main_file), load_external_data=False)
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        ops = {n.op_type for n in model.graph.node}
        if entry.name == "unet":
            assert {"DynamicQuantizeLinear", "MatMulInteger", "Conv"} <= ops and "ConvInteger" not in ops
            assert entry.max_abs_error <= entry.tolerance
            # every linear layer but the embeddings is int8
            floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
            float_linear = [n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                            and n.input[1] in floats]
            assert float_linear and all(FLOAT_LINEAR.search(name) for name in float_linear)
        else:  # only the UNet is quantized
            assert "DynamicQuantizeLinear" not in ops and entry.max_abs_error <= 1e-4
    def weight_bytes(artifact):  # the UNet's stored weights, less the float unit scales of its normalisations
        scales = {}
        for entry in Manifest.load(artifact).graphs:
            if entry.name == "unet" and entry.format == "onnx":
                model = onnx.load(str(artifact / entry.main_file), load_external_data=False)
                scales.update({t.name: 4 * int(np.prod(t.dims)) for t in model.graph.initializer
                               if t.name.startswith(NORM_SCALE_PREFIX)})
        assert scales  # the tiny UNet's normalisations are fused, and these scales are a large part of its weights
        return (artifact / "unet" / "weights.bin").stat().st_size - sum(scales.values())

    assert weight_bytes(int8_artifact) < 0.35 * weight_bytes(t2v_artifact)  # measured: 0.29


def test_int8_weights_use_seven_bits(int8_artifact):
    """Weights in [-64, 64] (``reduce_range``): without VNNI, full-range int8 weights overflow the 16-bit sums of
    ONNX Runtime's u8 x s8 kernel."""
    import onnx
    from onnx import numpy_helper

    entry = next(e for e in Manifest.load(int8_artifact).graphs if e.name == "unet")
    model = onnx.load(str(int8_artifact / entry.main_file))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights
    largest = max(int(np.abs(w.astype(np.int16)).max()) for w in weights)
    assert 60 <= largest <= 64


def test_int8_frames_are_close_to_float_frames(int8_artifact, t2v_artifact):
    from framegraph.runtime import TextToVideoSDPipeline

    prompt = json.loads((FIXTURES / "t2v-tiny" / "golden.json").read_text())["prompt"]
    frames = []
    for art in (t2v_artifact, int8_artifact):
        pipe = TextToVideoSDPipeline.from_artifacts(art)
        pipe.set_progress_bar_config(disable=True)
        frames.append(pipe(prompt, num_frames=4, num_inference_steps=10, generator=0).frames)
    mse = float(np.mean((frames[0] - frames[1]) ** 2))
    assert 0 < mse and 10 * np.log10(1 / mse) >= 30  # measured: 49 dB


def test_quantize_needs_onnx(t2v_tiny, tmp_path):
    from framegraph.export.pipeline_folder import PipelineFolder
    from framegraph.export.options import ExportOptions
    from framegraph.export.text_to_video_sd import export_text_to_video_sd

    with pytest.raises(ValueError, match="--quantize"):
        export_text_to_video_sd(PipelineFolder(t2v_tiny), tmp_path / "x",
                                ExportOptions(formats=("mindir",), quantize="int8", **T2V_EXPORT))
    assert not (tmp_path / "x").exists()
