"""The benchmark's peer engine: OpenVINO on CPU, used as OpenVINO's Stable Video Diffusion recipe uses it.

The four diffusers modules of a ``StableVideoDiffusionPipeline`` (CLIP image encoder, VAE encoder, UNet, VAE decoder)
are converted from PyTorch with ``openvino.convert_model`` at static shapes (the UNet at batch 2 for classifier-free
guidance, the decoder at the call's frame count: the bench passes no decode_chunk_size, so diffusers decodes all
frames at once), saved as IR and compiled on CPU with ``INFERENCE_PRECISION_HINT=f32``. diffusers' own pipeline then
drives them: its image encoder, VAE and UNet are thin ``torch.nn.Module`` stand-ins that call the compiled models.
The int8 variant compresses the converted models' weights with ``nncf.compress_weights`` (its default mode, int8).

Rule: conversion (torch load, tracing, compression, save) runs once per size in a child process and is cached under
``SPEC["outputs"]/openvino-peer-ir``; it is reported as ``convert_s`` (0 when cached) and kept out of the engine's
memory. The load proper is read_model + compile_model of every module plus building the pipeline (``ov_load_s``).
IR weights are saved in f32 (``compress_to_fp16=False``), so that the f32 engine holds the same weights as diffusers.
"""

import hashlib
import importlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np

logger = logging.getLogger("bench_openvino")

MODULES = ("image_encoder", "vae_encoder", "unet", "vae_decoder")


def import_peer():
    """Import what the peer engine runs on (OpenVINO, and torch/diffusers for the pipeline that drives it) before the
    caller starts its load clock. nncf is needed by the int8 conversion only, which runs in a child process."""
    import diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion  # noqa: F401
    import openvino  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401


def openvino_versions():
    """Installed versions of the peer's libraries, for the benchmark report (None where one is not installed)."""
    versions = {}
    for name in ("openvino", "nncf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# -- shapes and conversion ---------------------------------------------------------------------------------------
def _diffusers_config(folder, cls_name):
    """A diffusers module's config as the module would hold it: its __init__ defaults overlaid with config.json."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    params = inspect.signature(cls.__init__).parameters.values()
    config = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    config.update(cls.load_config(folder))
    return config


def _shapes(spec):
    """Static input shapes of each module at the spec's size, from the module configs."""
    folder = Path(spec["pipeline"])
    unet = _diffusers_config(folder / "unet", "UNetSpatioTemporalConditionModel")
    vae = _diffusers_config(folder / "vae", "AutoencoderKLTemporalDecoder")
    clip = json.loads((folder / "image_encoder" / "config.json").read_text())
    scale = 2 ** (len(vae["block_out_channels"]) - 1)  # the pipeline's vae_scale_factor
    h, w, f = spec["height"] // scale, spec["width"] // scale, spec["frames"]
    size = clip.get("image_size", 224)
    time_ids = unet["projection_class_embeddings_input_dim"] // unet["addition_time_embed_dim"]
    return {"image_encoder": [[1, clip.get("num_channels", 3), size, size]],
            "vae_encoder": [[1, vae["in_channels"], spec["height"], spec["width"]]],
            "unet": [[2, f, unet["in_channels"], h, w], [], [2, 1, unet["cross_attention_dim"]], [2, time_ids]],
            "vae_decoder": [[f, vae["latent_channels"], h, w]]}


def _ir_folder(spec, int8):
    folder = Path(spec["pipeline"]).resolve()
    key = [str(folder), (folder / "unet" / "config.json").stat().st_mtime_ns, spec["height"], spec["width"],
           spec["frames"], metadata.version("openvino")]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    return Path(spec["outputs"]) / "openvino-peer-ir" / ("int8" if int8 else "f32") / digest


def convert_peer(spec, int8=False):
    """The IR folder for ``spec`` (converted now in a child process unless cached) and the seconds that took."""
    ir = _ir_folder(spec, int8)
    if (ir / "done.json").exists():
        logger.info("OpenVINO IR cached at %s", ir)
        return ir, 0.0
    job = {"pipeline": str(Path(spec["pipeline"]).resolve()), "shapes": _shapes(spec), "int8": int8,
           "threads": spec["threads"], "out": str(ir)}
    start = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--convert", json.dumps(job)], check=True)
    seconds = time.perf_counter() - start
    logger.info("converted to OpenVINO IR%s in %.1f s: %s", " (int8 weights)" if int8 else "", seconds, ir)
    return ir, seconds


def _convert(job):
    """Child process: diffusers pipeline (fp32) -> ov.convert_model per module -> [nncf int8] -> save_model."""
    import openvino as ov
    import torch
    from diffusers import StableVideoDiffusionPipeline

    class Head(torch.nn.Module):  # fn(module, *inputs), the tensor the pipeline takes from a module, to trace
        def __init__(self, module, fn):
            super().__init__()
            self.inner, self.fn = module, fn

        def forward(self, *args):
            return self.fn(self.inner, *args)

    torch.set_num_threads(job["threads"])
    shapes, out = job["shapes"], Path(job["out"])
    frames = shapes["vae_decoder"][0][0]
    pipe = StableVideoDiffusionPipeline.from_pretrained(job["pipeline"])
    heads = {"image_encoder": (pipe.image_encoder, lambda m, x: m(x).image_embeds),
             "vae_encoder": (pipe.vae, lambda m, x: m.encode(x).latent_dist.mode()),
             "unet": (pipe.unet, lambda m, x, t, e, a: m(x, t, encoder_hidden_states=e, added_time_ids=a,
                                                          return_dict=False)[0]),
             "vae_decoder": (pipe.vae, lambda m, z: m.decode(z, num_frames=frames).sample)}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, (module, fn) in heads.items():
        start = time.perf_counter()
        example = tuple(torch.randn(shape) for shape in shapes[name])
        with torch.no_grad():
            model = ov.convert_model(Head(module, fn), example_input=example,
                                     input=[(shape, ov.Type.f32) for shape in shapes[name]])
        figures[f"{name}_convert_s"] = round(time.perf_counter() - start, 3)
        if job["int8"]:
            import nncf

            start = time.perf_counter()
            model = nncf.compress_weights(model)  # default: int8 weights, activations stay f32
            figures[f"{name}_compress_s"] = round(time.perf_counter() - start, 3)
        ov.save_model(model, tmp / f"{name}.xml", compress_to_fp16=False)
        logger.info("%s -> %s (%s)", name, tmp / f"{name}.xml", figures)
    (tmp / "done.json").write_text(json.dumps({**job, **figures, **openvino_versions()}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# -- the compiled models behind diffusers' pipeline ----------------------------------------------------------------
def _stand_in_classes():
    import torch

    class OVModule(torch.nn.Module):
        """A compiled OpenVINO model in the place of a diffusers/transformers module: float32 on CPU, with the
        module's config; one zero-size parameter, as the pipeline reads ``next(image_encoder.parameters()).dtype``."""

        def __init__(self, config, **compiled):
            super().__init__()
            self.config = config
            self.compiled = compiled
            self.dtype_probe = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

        dtype = property(lambda self: torch.float32)
        device = property(lambda self: torch.device("cpu"))

        def run(self, name, *tensors):
            model = self.compiled[name]
            arrays = [np.require(np.asarray(t, dtype=np.float32), requirements="C") for t in tensors]  # keeps 0-d
            for port, array in zip(model.inputs, arrays):
                if list(array.shape) != list(port.shape):
                    raise ValueError(f"OpenVINO {name} was converted for {list(port.shape)}, got {list(array.shape)}"
                                     " (another size, frame count or decode_chunk_size than the spec's)")
            return torch.from_numpy(model(arrays)[0])

    class OVImageEncoder(OVModule):
        def forward(self, pixel_values):
            return SimpleNamespace(image_embeds=self.run("image_encoder", pixel_values))

    class OVVae(OVModule):
        def encode(self, sample):
            mode = self.run("vae_encoder", sample)
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: mode))

        def decode(self, z, num_frames=None):
            return SimpleNamespace(sample=self.run("vae_decoder", z))

        def forward(self, sample, num_frames=None):  # the pipeline reads this signature to pass num_frames
            raise NotImplementedError("the pipeline calls encode and decode")

    class OVUNet(OVModule):
        def __init__(self, config, **compiled):
            super().__init__(config, **compiled)
            in_features = config.projection_class_embeddings_input_dim  # the pipeline checks the time ids' size
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=in_features))

        def forward(self, sample, timestep, encoder_hidden_states, added_time_ids, return_dict=True):
            timestep = torch.as_tensor(timestep).reshape(())  # one timestep for the batch (the IR takes a scalar)
            out = self.run("unet", sample, timestep, encoder_hidden_states, added_time_ids)
            return (out,) if not return_dict else SimpleNamespace(sample=out)

    return OVImageEncoder, OVVae, OVUNet


def load_peer(spec, inputs, image, result, int8=False):
    """bench_engines' loader contract: return ``(pipe, call)``; ``call(pipe, timer)`` runs one pipeline call as the
    diffusers engine does (same arguments, latents and conditioning-image noise) and returns its frames."""
    if spec["kind"] != "svd":
        raise ValueError(f"the OpenVINO peer engine covers SVD only, not {spec['kind']!r}")
    ir, convert_s = convert_peer(spec, int8)  # bench_engines converts before its load clock: cached here
    if convert_s:
        result.update(convert_s=round(convert_s, 3))
    result.update(openvino_ir=str(ir), **openvino_versions())

    import openvino as ov
    import torch
    import transformers
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.configuration_utils import FrozenDict

    start = time.perf_counter()
    threads = spec["threads"]
    torch.set_num_threads(threads)  # the pipeline's own torch work (preprocessing, guidance, scheduler)
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    compiled = {name: core.compile_model(core.read_model(ir / f"{name}.xml"), "CPU", config) for name in MODULES}
    folder = Path(spec["pipeline"])
    index = json.loads((folder / "model_index.json").read_text())
    scheduler, feature_extractor = (getattr(importlib.import_module(index[name][0]), index[name][1])
                                    .from_pretrained(folder / name) for name in ("scheduler", "feature_extractor"))
    OVImageEncoder, OVVae, OVUNet = _stand_in_classes()
    pipe = StableVideoDiffusionPipeline(
        vae=OVVae(FrozenDict(_diffusers_config(folder / "vae", "AutoencoderKLTemporalDecoder")),
                  vae_encoder=compiled["vae_encoder"], vae_decoder=compiled["vae_decoder"]),
        image_encoder=OVImageEncoder(transformers.AutoConfig.from_pretrained(folder / "image_encoder"),
                                     image_encoder=compiled["image_encoder"]),
        unet=OVUNet(FrozenDict(_diffusers_config(folder / "unet", "UNetSpatioTemporalConditionModel")),
                    unet=compiled["unet"]),
        scheduler=scheduler, feature_extractor=feature_extractor)
    pipe.set_progress_bar_config(disable=True)
    result.update(ov_load_s=round(time.perf_counter() - start, 3), openvino_build=ov.get_version(),
                  ov_threads=compiled["unet"].get_property("INFERENCE_NUM_THREADS"),
                  ov_precision=compiled["unet"].get_property("INFERENCE_PRECISION_HINT").to_string())
    latents, noise = torch.from_numpy(inputs["latents"]), torch.from_numpy(inputs["image_noise"])
    return pipe, lambda p, timer: svd_call(p, timer, spec, image, latents, noise)


def svd_call(pipe, timer, spec, image, latents, noise):
    """One diffusers StableVideoDiffusionPipeline call with the benchmark's arguments, for the diffusers engine and the
    OpenVINO peer alike. The latents are given, so the pipeline's one random draw is the conditioning image's noise:
    that draw returns ``noise`` (a torch tensor)."""
    import torch
    from diffusers.pipelines.stable_video_diffusion import pipeline_stable_video_diffusion as svd

    def draw(shape, *args, **kwargs):
        if tuple(shape) != tuple(noise.shape):
            raise RuntimeError(f"unexpected random draw of shape {tuple(shape)}: latents should have been given")
        return noise.clone()

    def on_step_end(p, i, t, kwargs):
        timer.step(kwargs["latents"].numpy())
        return {}

    original, svd.randn_tensor = svd.randn_tensor, draw
    try:
        with torch.no_grad():
            return pipe(image, height=spec["height"], width=spec["width"], num_frames=spec["frames"],
                        num_inference_steps=spec["steps"], min_guidance_scale=spec["min_guidance_scale"],
                        max_guidance_scale=spec["max_guidance_scale"], latents=latents, output_type="np",
                        callback_on_step_end=on_step_end).frames
    finally:
        svd.randn_tensor = original


if __name__ == "__main__":  # the conversion child process that convert_peer starts
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _convert(json.loads(sys.argv[sys.argv.index("--convert") + 1]))
