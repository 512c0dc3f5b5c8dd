"""Text-to-video: the exported tiny ModelScope pipeline against diffusers' golden outputs."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from conftest import FIXTURES
from framegraph.runtime.manifest import Manifest
from helpers import assert_close_scaled

META = json.loads((FIXTURES / "t2v-tiny" / "golden.json").read_text())


@pytest.fixture(scope="module", params=["onnxruntime", "openvino", "mindspore"])
def pipe(request, t2v_artifact):
    from framegraph.runtime import TextToVideoSDPipeline

    p = TextToVideoSDPipeline.from_artifacts(t2v_artifact, backend=request.param)
    p.set_progress_bar_config(disable=True)
    return p


def _frames(pipe, t2v_golden, **overrides):
    kwargs = dict(META["pipeline_call"], latents=t2v_golden["pipeline.latents"])
    kwargs.update(overrides)
    return pipe(META["prompt"], **kwargs).frames


def test_ddim_equals_diffusers(pipe, t2v_golden):
    out = _frames(pipe, t2v_golden)
    assert out.shape == t2v_golden["pipeline.frames_ddim"].shape
    assert np.abs(out - t2v_golden["pipeline.frames_ddim"]).max() <= 2e-3


def test_ddim_negative_prompt_equals_diffusers(pipe, t2v_golden):
    out = _frames(pipe, t2v_golden, negative_prompt=META["negative_prompt_case"])
    assert np.abs(out - t2v_golden["pipeline.frames_ddim_negative"]).max() <= 2e-3


def test_dpmsolver_switched_the_diffusers_way_equals_diffusers(pipe, t2v_golden):
    from framegraph.runtime import DDIMScheduler, DPMSolverMultistepScheduler

    ddim = pipe.scheduler
    try:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        out = _frames(pipe, t2v_golden, num_inference_steps=META["dpmsolver_steps"])
    finally:
        pipe.scheduler = ddim
    assert isinstance(ddim, DDIMScheduler)
    assert np.abs(out - t2v_golden["pipeline.frames_dpmsolver"]).max() <= 2e-3


def test_exported_graphs_reproduce_component_goldens(t2v_artifact, t2v_golden):
    m = Manifest.load(t2v_artifact)
    assert m.pipeline == "text-to-video-sd"
    g = t2v_golden

    def session(name, **bucket):
        return ort.InferenceSession(str(t2v_artifact / m.find(name, "onnx", **bucket).main_file),
                                    providers=["CPUExecutionProvider"])

    text = session("text_encoder", batch=1)
    for i in range(2):
        out = text.run(None, {"input_ids": g["text_encoder.input_ids"][i:i + 1].astype(np.int64)})[0]
        assert_close_scaled(out, g["text_encoder.last_hidden_state"][i:i + 1], name="last_hidden_state")
    unet = session("unet", num_frames=4, batch=2)
    out = unet.run(None, {"sample": g["unet.sample"], "timestep": np.asarray(g["unet.timestep"], np.float32).reshape(()),
                          "encoder_hidden_states": g["unet.encoder_hidden_states"]})[0]
    assert_close_scaled(out, g["unet.out"], name="unet.out")
    dec = session("vae_decoder", chunk=3)
    latents = g["vae_decode.latents"]
    out = np.concatenate([dec.run(None, {"latents": latents[:3]})[0],
                          dec.run(None, {"latents": np.concatenate([latents[3:], np.zeros_like(latents[:2])])})[0][:1]])
    assert_close_scaled(out, g["vae_decode.sample"], name="vae_decode.sample")
    assert (t2v_artifact / "tokenizer" / "vocab.json").is_file()


def test_split_guidance_equals_diffusers(t2v_artifact, t2v_golden):
    """Guidance's halves as two UNet runs (guidance 9, so an error in either half shows nine-fold)."""
    from framegraph.runtime import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_artifacts(t2v_artifact, split_guidance=True)
    pipe.set_progress_bar_config(disable=True)
    out = _frames(pipe, t2v_golden)
    assert np.abs(out - t2v_golden["pipeline.frames_ddim"]).max() <= 2e-3


def test_vae_slicing_does_not_change_frames(t2v_artifact, t2v_golden):
    from framegraph.runtime import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_artifacts(t2v_artifact)
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((2, 4, 4, 32, 32)).astype(np.float32)
    events = []
    video = pipe.decode_latents(latents, 32, 32, decode_chunk_size=3, progress=events.append)
    assert video.shape == (2, 3, 4, 32, 32)
    assert events == ["decode"] * 3  # 8 frames in slices of 3
    single = pipe.decode_latents(latents[1:], 32, 32)
    np.testing.assert_allclose(video[1:], single, atol=1e-6)


@pytest.mark.parametrize("kwargs, argument", [
    ({"num_frames": 5}, "num_frames"),
    ({"height": 64}, "height"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"eta": 2.0}, "eta"),
    ({"output_type": "gif"}, "output_type"),
    ({"decode_chunk_size": 2}, "decode_chunk_size"),
    ({"latents": np.zeros((1, 4, 4, 8, 8), np.float32)}, "latents"),
])
def test_bad_arguments_name_the_argument(t2v_artifact, kwargs, argument):
    from framegraph.runtime import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_artifacts(t2v_artifact, verify=False)
    call = {"num_frames": 4, "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=argument):
        pipe("a prompt", **call)


def test_prompt_type_is_checked(t2v_artifact):
    from framegraph.runtime import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_artifacts(t2v_artifact, verify=False)
    with pytest.raises(ValueError, match="prompt"):  # diffusers' check_inputs raises ValueError too
        pipe(123, num_frames=4, num_inference_steps=1)
    with pytest.raises(ValueError, match="prompt"):
        pipe(num_frames=4, num_inference_steps=1)


def test_artifact_without_tokenizer_runs_from_embeddings_and_says_why_prompts_fail(t2v_artifact, t2v_golden,
                                                                                 tmp_path):
    """A --random-weights export from a config folder (no tokenizer/) still runs from prompt embeddings."""
    import shutil

    from framegraph.runtime import TextToVideoSDPipeline

    art = tmp_path / "no-tokenizer"
    shutil.copytree(t2v_artifact, art)
    shutil.rmtree(art / "tokenizer")
    manifest = Manifest.load(art)
    manifest.files = [f for f in manifest.files if not f.path.startswith("tokenizer/")]
    manifest.save(art)
    with_tokenizer = TextToVideoSDPipeline.from_artifacts(t2v_artifact, verify=False)
    pipe = TextToVideoSDPipeline.from_artifacts(art)
    with pytest.raises(ValueError, match="no tokenizer.*prompt_embeds"):
        pipe("a prompt", num_frames=4, num_inference_steps=1)
    embeds, negative = with_tokenizer.encode_prompt(META["prompt"], True)
    call = dict(META["pipeline_call"], latents=t2v_golden["pipeline.latents"])
    out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, **call).frames
    assert np.abs(out - t2v_golden["pipeline.frames_ddim"]).max() <= 2e-3


def test_export_without_tokenizer_fails_before_building_unless_random_weights(t2v_tiny, tmp_path):
    import shutil

    from framegraph.export.pipeline_folder import PipelineFolder
    from framegraph.export.options import ExportOptions
    from framegraph.export.text_to_video_sd import export_text_to_video_sd

    folder = tmp_path / "pipeline"
    shutil.copytree(t2v_tiny, folder)
    shutil.rmtree(folder / "tokenizer")
    options = ExportOptions(formats=("onnx",), frames=[4], height=32, width=32)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        export_text_to_video_sd(PipelineFolder(folder), tmp_path / "art", options)
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art.partial-*"))


def test_call_defaults_come_from_the_artifact(t2v_artifact):
    """The artifact has no bucket for diffusers' 16 frames: a call without num_frames takes the manifest's."""
    from framegraph.runtime import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_artifacts(t2v_artifact, verify=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.artifact.defaults["num_frames"] == 4
    frames = pipe("a prompt", num_inference_steps=1, output_type="np").frames
    assert frames.shape[1] == 4
    assert pipe.call_arguments(num_frames=None, guidance_scale=None, eta=7.0) == {
        "num_frames": 4, "guidance_scale": 9.0, "eta": 7.0}
