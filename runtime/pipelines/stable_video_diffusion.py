"""StableVideoDiffusionPipeline over compiled graphs: diffusers' call signature, defaults and outputs."""

import dataclasses
import logging
import math

import numpy as np

from framegraph.runtime.params import InvalidRequestError, Param, brief
from framegraph.runtime.pipelines.common import (CACHE_PARAM, VIDEO_PARAMS, ArtifactPipeline, ProgressBar,
                                                 check_cache, check_frames, check_latents, check_size, chunks,
                                                 declared_call, make_rng, randn)
from framegraph.runtime.schedulers import load_scheduler

logger = logging.getLogger(__name__)

PIPELINE_KIND = "stable-video-diffusion"
OUTPUT_TYPES = ("pil", "np", "latent")
# The call's arguments (besides ``image`` and the Python-only ones), with diffusers' defaults: declared once, read by
# the engine, the HTTP server and the CLI; the export writes the defaults into the manifest.
CALL_PARAMS = VIDEO_PARAMS + (
    Param("num_inference_steps", "int", minimum=1, maximum=1000, default=25, flag="--steps",
          help="denoising steps"),
    Param("min_guidance_scale", "float", minimum=0.0, maximum=100.0, default=1.0,
          help="guidance of the first frame"),
    Param("max_guidance_scale", "float", minimum=0.0, maximum=100.0, default=3.0,
          help="guidance of the last frame (above 1: classifier-free guidance)"),
    Param("fps", "int", minimum=1, maximum=1000, default=7,
          help="frames per second of the video (the model is also conditioned on it)"),
    Param("motion_bucket_id", "int", minimum=0, maximum=1023, default=127, help="how much motion"),
    Param("noise_aug_strength", "float", minimum=0.0, maximum=10.0, default=0.02,
          help="noise added to the conditioning image"),
    Param("decode_chunk_size", "int", minimum=1, maximum=1024,
          help="frames decoded per VAE call (default: the largest the artifact has for num_frames)"),
    CACHE_PARAM,
    Param("num_videos_per_prompt", "int", minimum=1, maximum=16, http=False, cli=False),
    Param("output_type", "choice", choices=OUTPUT_TYPES, http=False, cli=False),
    Param("latents", "array", http=False, cli=False),
    Param("image_noise", "array", http=False, cli=False),
)
# what the export writes into the manifest's defaults
CALL_DEFAULTS = {p.name: p.default for p in CALL_PARAMS if p.default is not None}


@dataclasses.dataclass
class StableVideoDiffusionPipelineOutput:
    frames: object


class StableVideoDiffusionPipeline(ArtifactPipeline):
    """Image-to-video with the graphs of an ``svd-export`` artifact (no torch, no MindSpore for ONNX)."""

    kind = PIPELINE_KIND
    call_params = CALL_PARAMS
    call_defaults = CALL_DEFAULTS
    video_fps_param = next(p for p in CALL_PARAMS if p.name == "fps")  # the conditioning fps is the video's too
    input_param = Param("image", "image", required=True, cli=False, flag="--image",
                        help="conditioning image: a path or URL on the command line, an uploaded file over HTTP")

    def __init__(self, artifact, scheduler):
        self.artifact = artifact
        self.scheduler = scheduler
        self.progress_bar_config = {}
        self.batch = int(artifact.manifest.options.get("batch", 1))

    @classmethod
    def _from_artifact(cls, artifact):
        return cls(artifact, load_scheduler(artifact.manifest.scheduler))

    # -- checks ------------------------------------------------------------------------------------------------
    def default_decode_chunk(self, num_frames):
        """The largest exported decoder chunk that covers ``num_frames`` (its remainder included), else
        ``num_frames`` (diffusers' default)."""
        have = set(self.artifact.buckets("vae_decoder", "chunk"))
        fits = [c for c in sorted(have, reverse=True) if c <= num_frames and (num_frames % c in have | {0})]
        return fits[0] if fits else num_frames

    def check_request(self, request):
        if request.get("decode_chunk_size") is None:
            request["decode_chunk_size"] = self.default_decode_chunk(request["num_frames"])
        request.setdefault("num_videos_per_prompt", 1)
        self.check_inputs(request["image"], **{name: request[name] for name in self.defaulted()},
                          decode_chunk_size=request["decode_chunk_size"],
                          cache_interval=request.get("cache_interval"),
                          num_videos_per_prompt=request["num_videos_per_prompt"], output_type=request["output_type"])

    def work(self, request):
        from framegraph.runtime.image import as_image_list

        videos = len(as_image_list(request["image"])) * request["num_videos_per_prompt"]
        chunks = 0 if request["output_type"] == "latent" else videos * math.ceil(
            request["num_frames"] / request["decode_chunk_size"])
        return request["num_inference_steps"], chunks

    def check_inputs(self, image, height, width, num_frames, num_inference_steps=25, fps=7, motion_bucket_id=127,
                     noise_aug_strength=0.02, decode_chunk_size=None, num_videos_per_prompt=1, output_type="pil",
                     sigmas=None, min_guidance_scale=1.0, max_guidance_scale=3.0, cache_interval=None):
        """Raise :class:`InvalidRequestError` (a ValueError naming the argument in ``field``) unless this artifact
        can serve a call with these (resolved, see ``call_arguments``) arguments. Runs no graph."""
        from framegraph.runtime.image import as_image_list

        problem = None
        try:
            as_image_list(image)
        except (TypeError, ValueError) as exc:
            problem = f"image: {exc}"
        if problem is not None:  # raised outside the except block: no frame holding the image is kept
            raise InvalidRequestError(problem, field="image")
        declared_call(CALL_PARAMS, dict(
            height=height, width=width, num_frames=num_frames, fps=fps, motion_bucket_id=motion_bucket_id,
            noise_aug_strength=noise_aug_strength, min_guidance_scale=min_guidance_scale,
            max_guidance_scale=max_guidance_scale, decode_chunk_size=decode_chunk_size,
            num_videos_per_prompt=num_videos_per_prompt, output_type=output_type, cache_interval=cache_interval,
            num_inference_steps=num_inference_steps if sigmas is None else None))
        check_size(self.artifact, height, width)
        check_frames(self.artifact, num_frames)
        check_cache(self.artifact, cache_interval)
        if output_type != "latent":
            if decode_chunk_size is None:
                decode_chunk_size = self.default_decode_chunk(num_frames)
            chunk = min(decode_chunk_size, num_frames)
            needed = {chunk} | ({num_frames % chunk} if num_frames % chunk else set())
            have = self.artifact.buckets("vae_decoder", "chunk")
            if not needed <= set(have):
                raise InvalidRequestError(
                    f"decode_chunk_size={brief(decode_chunk_size)} needs decoder graphs for chunks "
                    f"{sorted(needed)}; this artifact has chunks {have} — pass one of them or re-export with "
                    f"--decode-chunk-sizes {','.join(map(str, sorted(needed)))}", field="decode_chunk_size")

    # -- stages ------------------------------------------------------------------------------------------------
    def _encode_image(self, images, num_videos_per_prompt, cfg):
        from framegraph.runtime.image import clip_pixel_values

        c = self.artifact.constants
        pixels = clip_pixel_values(images, c["image_mean"], c["image_std"], size=c["clip_image_size"])
        graph = self.artifact.graph("image_encoder", batch=self.batch)
        embeds = np.concatenate([graph(pixel_values=p)["image_embeds"] for p in chunks(pixels, self.batch)])
        graph.release_memory()  # the encoders run once per call: their weight pages need not stay resident
        embeds = np.repeat(embeds[:, None, :], num_videos_per_prompt, axis=0)  # (B*n, 1, D), diffusers' order
        if cfg:
            embeds = np.concatenate([np.zeros_like(embeds), embeds])
        return embeds

    def _encode_vae_image(self, image, num_videos_per_prompt, cfg, height, width):
        graph = self.artifact.graph("vae_encoder", batch=self.batch, height=height, width=width)
        latents = np.concatenate([graph(sample=x)["latent"] for x in chunks(image, self.batch)])
        graph.release_memory()
        latents = np.tile(latents, (num_videos_per_prompt, 1, 1, 1))  # diffusers repeats the whole batch
        if cfg:
            latents = np.concatenate([np.zeros_like(latents), latents])
        return latents

    def decode_latents(self, latents, num_frames, decode_chunk_size, height, width, progress=None):
        """Decode [N, F, C, h, w] latents video by video in chunks of ``decode_chunk_size`` frames."""
        latents = latents / self.artifact.constants["vae_scaling_factor"]
        videos = []
        for video in latents:
            frames = []
            for start in range(0, num_frames, decode_chunk_size):
                chunk = video[start:start + decode_chunk_size]
                graph = self.artifact.graph("vae_decoder", chunk=chunk.shape[0], height=height, width=width)
                frames.append(graph(latents=np.ascontiguousarray(chunk))["sample"])
                if progress:
                    progress("decode")
            videos.append(np.concatenate(frames))
        return np.stack(videos).transpose(0, 2, 1, 3, 4).astype(np.float32)  # (N, C, F, H, W) like diffusers

    # -- call --------------------------------------------------------------------------------------------------
    def __call__(self, image, height=None, width=None, num_frames=None, num_inference_steps=None, sigmas=None,
                 min_guidance_scale=None, max_guidance_scale=None, fps=None, motion_bucket_id=None,
                 noise_aug_strength=None, decode_chunk_size=None, cache_interval=None, num_videos_per_prompt=1,
                 generator=None,
                 latents=None, output_type="pil", callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), return_dict=True, image_noise=None,
                 progress=None):
        from framegraph.runtime.image import as_image_list, postprocess_video, vae_pixel_values

        call = self.call_arguments(height=height, width=width, num_frames=num_frames,
                                   num_inference_steps=num_inference_steps, fps=fps, motion_bucket_id=motion_bucket_id,
                                   noise_aug_strength=noise_aug_strength, min_guidance_scale=min_guidance_scale,
                                   max_guidance_scale=max_guidance_scale)
        self.check_inputs(image, **call, decode_chunk_size=decode_chunk_size, cache_interval=cache_interval,
                          num_videos_per_prompt=num_videos_per_prompt, output_type=output_type, sigmas=sigmas)
        height, width, num_frames = call["height"], call["width"], call["num_frames"]
        num_inference_steps, fps, motion_bucket_id = call["num_inference_steps"], call["fps"], call["motion_bucket_id"]
        noise_aug_strength = call["noise_aug_strength"]
        min_guidance_scale, max_guidance_scale = call["min_guidance_scale"], call["max_guidance_scale"]
        if decode_chunk_size is None:
            decode_chunk_size = self.default_decode_chunk(num_frames)
        for name in callback_on_step_end_tensor_inputs:
            if name != "latents":
                raise ValueError(f"callback_on_step_end_tensor_inputs may only name 'latents', got {name!r}")
        images = as_image_list(image)
        batch_size = len(images)
        n = batch_size * num_videos_per_prompt
        cfg = max_guidance_scale > 1
        rng = make_rng(generator)
        unet = self._unet_for_call(num_frames, cfg, height, width, cache_interval)
        embeds = self._encode_image(images, num_videos_per_prompt, cfg)
        pixels = vae_pixel_values(images, height, width)
        if image_noise is None:
            image_noise = randn(rng, pixels.shape)
        elif tuple(np.shape(image_noise)) != pixels.shape:
            raise ValueError(f"image_noise must have shape {pixels.shape}, got {np.shape(image_noise)}")
        pixels = (pixels + noise_aug_strength * np.asarray(image_noise, dtype=np.float32)).astype(np.float32)
        image_latents = self._encode_vae_image(pixels, num_videos_per_prompt, cfg, height, width)
        image_latents = np.repeat(image_latents[:, None], num_frames, axis=1)

        added = np.array([[fps - 1, motion_bucket_id, noise_aug_strength]], dtype=np.float32)
        added_time_ids = np.tile(added, (n * (2 if cfg else 1), 1))

        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas)
        else:
            self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        c = self.artifact.constants
        f = c["vae_scale_factor"]
        shape = (n, num_frames, c["unet_in_channels"] // 2, height // f, width // f)
        if latents is None:
            latents = randn(rng, shape)
        else:
            latents = check_latents(latents, shape)
        latents = (latents * self.scheduler.init_noise_sigma).astype(np.float32)

        guidance = np.linspace(min_guidance_scale, max_guidance_scale, num_frames, dtype=np.float32)
        guidance = np.tile(guidance[None], (n, 1))[:, :, None, None, None]

        self._prefetch_unet(unet)
        bar = ProgressBar(len(timesteps), progress, **self.progress_bar_config)
        for i, t in enumerate(timesteps):
            model_input = np.concatenate([latents] * 2) if cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            model_input = np.concatenate([model_input, image_latents], axis=2).astype(np.float32)
            noise_pred = self._unet({"sample": model_input, "encoder_hidden_states": embeds,
                                     "added_time_ids": added_time_ids}, t, cfg, unet, i, last=i == len(timesteps) - 1)
            if cfg:
                uncond, cond = noise_pred[:n], noise_pred[n:]
                noise_pred = uncond + guidance * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, generator=rng).prev_sample.astype(np.float32)
            latents = self._step_callback(callback_on_step_end, i, t, latents)
            bar.step("denoise")
        self._release_unet(unet)

        if output_type == "latent":
            frames = latents
        else:
            video = self.decode_latents(latents, num_frames, decode_chunk_size, height, width, bar.step)
            frames = postprocess_video(video, output_type)
        bar.close()
        if not return_dict:
            return (frames,)
        return StableVideoDiffusionPipelineOutput(frames=frames)
