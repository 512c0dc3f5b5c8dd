"""StableVideoDiffusionPipeline over the exported tiny artifact, against diffusers' golden outputs."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES

BACKENDS = ["onnxruntime", "openvino", "mindspore"]


@pytest.fixture(scope="module")
def input_image():
    return Image.open(FIXTURES / "svd-tiny" / "input.png").convert("RGB")


@pytest.fixture(scope="module", params=BACKENDS)
def pipe(request, svd_artifact):
    from framegraph.runtime import StableVideoDiffusionPipeline

    p = StableVideoDiffusionPipeline.from_artifacts(svd_artifact, backend=request.param)
    p.set_progress_bar_config(disable=True)
    return p


def _golden_call(svd_golden_call, svd_golden, **overrides):
    kwargs = dict(svd_golden_call["pipeline_call"])
    kwargs.update(latents=svd_golden["pipeline.latents"], image_noise=svd_golden["pipeline.image_noise"],
                  output_type="np")
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize("key, overrides", [
    ("pipeline.frames", {}),
    ("pipeline.frames_chunk1", {"decode_chunk_size": 1}),
    ("pipeline.final_latents", {"output_type": "latent"}),
])
def test_end_to_end_equals_diffusers(pipe, input_image, svd_golden, svd_golden_call, key, overrides):
    out = pipe(input_image, **_golden_call(svd_golden_call, svd_golden, **overrides)).frames
    ref = svd_golden[key]
    assert out.shape == ref.shape
    err = float(np.abs(out - ref).max())
    assert err <= 2e-3, f"{key} on {pipe.artifact.backend.name}: max abs error {err:.2e}"


def test_batch_of_two_equals_two_single_runs(svd_artifact, input_image, svd_golden_call):
    from framegraph.runtime import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline.from_artifacts(svd_artifact)
    pipe.set_progress_bar_config(disable=True)
    call = dict(svd_golden_call["pipeline_call"], output_type="np")
    other = input_image.transpose(Image.FLIP_LEFT_RIGHT)
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 2, 4, 16, 16)).astype(np.float32)
    noise = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    both = pipe([input_image, other], latents=latents, image_noise=noise, **call).frames
    first = pipe(input_image, latents=latents[:1], image_noise=noise[:1], **call).frames
    second = pipe(other, latents=latents[1:], image_noise=noise[1:], **call).frames
    np.testing.assert_allclose(both, np.concatenate([first, second]), atol=1e-6)


def _unet_batches(pipe):
    """The batch of every UNet graph ``pipe`` asks its artifact for, recorded as it asks."""
    asked, original = [], pipe.artifact.graph

    def graph(name, **bucket):
        if name == "unet":
            asked.append(bucket["batch"])
        return original(name, **bucket)

    pipe.artifact.graph = graph
    return asked


def test_split_guidance_runs_the_halves_apart_and_equals_diffusers(svd_artifact, input_image, svd_golden,
                                                                  svd_golden_call):
    """Guidance's halves as two runs of the UNet at the call's batch: diffusers' frames, as the doubled batch
    gives them, for one video and for two (whose halves interleave: both unconditional runs, then both
    conditional ones)."""
    from framegraph.runtime import StableVideoDiffusionPipeline

    frames, batches = {}, {}
    other = input_image.transpose(Image.FLIP_LEFT_RIGHT)
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 2, 4, 16, 16)).astype(np.float32)
    noise = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    call = dict(svd_golden_call["pipeline_call"], output_type="np")
    for split in (False, True):
        pipe = StableVideoDiffusionPipeline.from_artifacts(svd_artifact, split_guidance=split)
        pipe.set_progress_bar_config(disable=True)
        batches[split] = _unet_batches(pipe)
        frames[split] = pipe(input_image, **_golden_call(svd_golden_call, svd_golden)).frames
        frames[split, 2] = pipe([input_image, other], latents=latents, image_noise=noise, **call).frames
    assert set(batches[False]) == {2} and set(batches[True]) == {1}
    assert float(np.abs(frames[True] - svd_golden["pipeline.frames"]).max()) <= 2e-3
    # the kernels block a batch of one differently from a batch of two: float32 rounding, 1.4e-5 here
    np.testing.assert_allclose(frames[True], frames[False], atol=1e-4)
    np.testing.assert_allclose(frames[True, 2], frames[False, 2], atol=1e-4)


def test_same_seed_is_bit_identical(svd_artifact, input_image):
    from framegraph.runtime import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline.from_artifacts(svd_artifact)
    pipe.set_progress_bar_config(disable=True)
    call = {"num_frames": 3, "num_inference_steps": 2, "decode_chunk_size": 2, "output_type": "np"}
    a = pipe(input_image, generator=7, **call).frames
    b = pipe(input_image, generator=7, **call).frames
    c = pipe(input_image, generator=8, **call).frames
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (1, 3, 32, 32, 3) and 0.0 <= a.min() and a.max() <= 1.0


def test_runtime_runs_with_mindspore_blocked(svd_artifact):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["mindspore"] = None
        sys.modules["torch"] = None
        sys.modules["diffusers"] = None
        from PIL import Image
        from framegraph.runtime import StableVideoDiffusionPipeline
        pipe = StableVideoDiffusionPipeline.from_artifacts({str(svd_artifact)!r})
        frames = pipe(Image.new("RGB", (40, 30), (200, 30, 90)), num_frames=2, num_inference_steps=2,
                      generator=0).frames
        assert len(frames) == 1 and len(frames[0]) == 2 and frames[0][0].size == (32, 32)
        assert not any(m.startswith(("framegraph.models", "framegraph.export")) for m in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_mp4_written_and_read_back(svd_artifact, input_image, tmp_path):
    from framegraph.runtime import StableVideoDiffusionPipeline, export_to_video
    from framegraph.runtime.video import read_video_info

    pipe = StableVideoDiffusionPipeline.from_artifacts(svd_artifact)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(input_image, num_frames=3, num_inference_steps=2, decode_chunk_size=2, generator=0).frames[0]
    path = export_to_video(frames, tmp_path / "video.mp4", fps=6)
    info = read_video_info(path)
    assert (info.frames, info.width, info.height) == (3, 32, 32)
    assert info.fps == pytest.approx(6)


@pytest.fixture(scope="module")
def onnx_pipe(svd_artifact):
    from framegraph.runtime import StableVideoDiffusionPipeline

    p = StableVideoDiffusionPipeline.from_artifacts(svd_artifact)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("kwargs, argument", [
    ({"num_frames": 5}, "num_frames"),
    ({"height": 64, "width": 64}, "height"),
    ({"decode_chunk_size": 3, "num_frames": 3}, "decode_chunk_size"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"fps": 0}, "fps"),
    ({"motion_bucket_id": -1}, "motion_bucket_id"),
    ({"noise_aug_strength": -0.5}, "noise_aug_strength"),
    ({"latents": np.zeros((1, 2, 4, 8, 8), np.float32), "num_frames": 2}, "latents"),
    ({"output_type": "mp4"}, "output_type"),
    ({"generator": "seed"}, "generator"),
])
def test_bad_arguments_name_the_argument(onnx_pipe, input_image, kwargs, argument):
    call = {"num_frames": 2, "num_inference_steps": 1, **kwargs}
    with pytest.raises((ValueError, TypeError)) as info:
        onnx_pipe(input_image, **call)
    assert argument in str(info.value)


def test_bad_image_type_is_clear(onnx_pipe):
    with pytest.raises(ValueError, match="image"):  # diffusers' check_inputs raises ValueError too
        onnx_pipe(12345, num_frames=2, num_inference_steps=1)
