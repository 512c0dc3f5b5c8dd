"""TextToVideoSDPipeline (ModelScope / VideoFusion) over compiled graphs: diffusers' call signature and outputs."""

import dataclasses
import logging
import math
import threading

import numpy as np

from framegraph.runtime.params import InvalidRequestError, Param, brief
from framegraph.runtime.pipelines.common import (CACHE_PARAM, VIDEO_PARAMS, ArtifactPipeline, ProgressBar,
                                                 check_cache, check_frames, check_latents, check_size, chunks,
                                                 declared_call, make_rng, randn)
from framegraph.runtime.schedulers import load_scheduler

logger = logging.getLogger(__name__)

PIPELINE_KIND = "text-to-video-sd"
OUTPUT_TYPES = ("np", "pil", "latent")
# The call's arguments (besides the prompt), with diffusers' defaults: declared once, read by the engine, the HTTP
# server and the CLI; the export writes the defaults into the manifest (an artifact without a bucket for diffusers'
# 16 frames records the frame count it has).
CALL_PARAMS = VIDEO_PARAMS[:2] + (
    Param("num_frames", "int", minimum=1, maximum=1024, default=16,
          help="frames of the video (default: the artifact's)"),
    Param("num_inference_steps", "int", minimum=1, maximum=1000, default=50, flag="--steps",
          help="denoising steps"),
    Param("guidance_scale", "float", minimum=0.0, maximum=100.0, default=9.0,
          help="classifier-free guidance (above 1: on)"),
    Param("negative_prompt", "text", maximum=4000, help="what the video should not show"),
    Param("eta", "float", minimum=0.0, maximum=1.0, default=0.0, help="DDIM's eta"),
    Param("decode_chunk_size", "int", minimum=1, maximum=1024,
          help="frames decoded per VAE call (default: the largest the artifact has)"),
    CACHE_PARAM,
    Param("output_type", "choice", choices=OUTPUT_TYPES, http=False, cli=False),
    Param("latents", "array", http=False, cli=False),
)
# what the export writes into the manifest's defaults
CALL_DEFAULTS = {p.name: p.default for p in CALL_PARAMS if p.default is not None}
# playback rate of the written video (ModelScope's videos are 8 frames per second; the model takes no fps)
VIDEO_FPS_PARAM = Param("fps", "int", minimum=1, maximum=1000, default=8,
                        help="frames per second of the written video (the model takes no fps)")


@dataclasses.dataclass
class TextToVideoSDPipelineOutput:
    frames: object


class TextToVideoSDPipeline(ArtifactPipeline):
    """Text-to-video with the graphs of an exported ModelScope artifact. ``pipe.scheduler`` may be replaced, the
    diffusers way: ``pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``."""

    kind = PIPELINE_KIND
    call_params = CALL_PARAMS
    call_defaults = CALL_DEFAULTS
    video_fps_param = VIDEO_FPS_PARAM
    input_param = Param("prompt", "text", required=True, maximum=4000, cli=False, flag="--prompt",
                        help="what the video shows")

    def __init__(self, artifact, scheduler, tokenizer):
        self.artifact = artifact
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()  # the fast tokenizer keeps padding settings between calls
        self.progress_bar_config = {}
        self.batch = int(artifact.manifest.options.get("batch", 1))

    @classmethod
    def _from_artifact(cls, artifact):
        from transformers import CLIPTokenizer

        folder = artifact.path / "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(str(folder)) if folder.is_dir() else None
        if tokenizer is None:
            logger.warning("%s has no tokenizer/: prompts cannot be encoded, pass prompt_embeds and "
                           "negative_prompt_embeds", artifact.path)
        return cls(artifact, load_scheduler(artifact.manifest.scheduler), tokenizer)

    # -- prompt ------------------------------------------------------------------------------------------------
    def _tokens(self, texts):
        max_length = self.artifact.constants["max_length"]
        if self.tokenizer is None:
            raise ValueError(
                f"{self.artifact.path} has no tokenizer/ (it was exported from a folder without one, e.g. with "
                "--random-weights from a config folder): pass prompt_embeds and negative_prompt_embeds, or copy a "
                f"CLIP tokenizer folder to {self.artifact.path / 'tokenizer'}"
            )
        with self._tokenizer_lock:
            ids = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                 return_tensors="np").input_ids
            longest = self.tokenizer(texts, padding="longest", return_tensors="np").input_ids
        if longest.shape[-1] > ids.shape[-1]:
            logger.warning("prompt truncated to %d tokens (CLIP's limit)", max_length)
        return ids.astype(np.int64)

    def _embed(self, texts):
        graph = self.artifact.graph("text_encoder", batch=self.batch)
        ids = self._tokens(texts)
        embeds = np.concatenate([graph(input_ids=x)["last_hidden_state"] for x in chunks(ids, self.batch)])
        graph.release_memory()  # runs once per call: its weight pages need not stay resident through denoising
        return embeds

    def encode_prompt(self, prompt, do_classifier_free_guidance, negative_prompt=None, prompt_embeds=None,
                      negative_prompt_embeds=None):
        """(prompt_embeds, negative_prompt_embeds) as diffusers computes them (empty negative prompt by default)."""
        if prompt_embeds is None:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self._embed(texts)
        prompt_embeds = np.asarray(prompt_embeds, dtype=np.float32)
        batch_size = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                negative = [""] * batch_size
            elif isinstance(negative_prompt, str):
                negative = [negative_prompt] * batch_size
            else:
                negative = list(negative_prompt)
                if len(negative) != batch_size:
                    raise ValueError(f"negative_prompt has {len(negative)} entries but prompt has {batch_size}")
            negative_prompt_embeds = self._embed(negative)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = np.asarray(negative_prompt_embeds, dtype=np.float32)
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(f"negative_prompt_embeds shape {negative_prompt_embeds.shape} must equal "
                                 f"prompt_embeds shape {prompt_embeds.shape}")
        return prompt_embeds, negative_prompt_embeds

    # -- checks ------------------------------------------------------------------------------------------------
    def for_thread(self):
        # A Hugging Face tokenizer keeps its padding / truncation settings on the object, and the pipeline tokenizes
        # twice with different ones: shared between threads, one call's "longest" padding leaks into another's.
        import copy

        pipeline = copy.copy(self)
        pipeline.tokenizer = copy.deepcopy(self.tokenizer)
        return pipeline

    def check_request(self, request):
        self.check_inputs(request["prompt"], **{name: request[name] for name in self.defaulted()},
                          output_type=request["output_type"], decode_chunk_size=request.get("decode_chunk_size"),
                          cache_interval=request.get("cache_interval"))

    def work(self, request):
        chunk = request.get("decode_chunk_size") or max(self.artifact.buckets("vae_decoder", "chunk"))
        chunks = 0 if request["output_type"] == "latent" else math.ceil(request["num_frames"] / chunk)
        return request["num_inference_steps"], chunks

    def check_inputs(self, prompt, height, width, num_frames, num_inference_steps=50, guidance_scale=9.0, eta=0.0,
                     output_type="np", decode_chunk_size=None, prompt_embeds=None, cache_interval=None):
        """Raise :class:`InvalidRequestError` (a ValueError naming the argument in ``field``) unless this artifact
        can serve a call with these (resolved, see ``call_arguments``) arguments. Runs no graph."""
        if (prompt is None) == (prompt_embeds is None):
            raise InvalidRequestError("pass exactly one of prompt (str or list of str) and prompt_embeds",
                                      field="prompt")
        if prompt is not None and not (isinstance(prompt, str) or (
                isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt))):
            raise InvalidRequestError("prompt must be a string or a non-empty list of strings, got "
                                      f"{type(prompt).__name__}", field="prompt")
        declared_call(CALL_PARAMS, dict(
            height=height, width=width, num_frames=num_frames, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, eta=eta, output_type=output_type, decode_chunk_size=decode_chunk_size,
            cache_interval=cache_interval))
        check_size(self.artifact, height, width)
        check_frames(self.artifact, num_frames)
        check_cache(self.artifact, cache_interval)
        have = self.artifact.buckets("vae_decoder", "chunk")
        if decode_chunk_size is not None and decode_chunk_size not in have:
            raise InvalidRequestError(
                f"decode_chunk_size={brief(decode_chunk_size)} has no decoder graph; this artifact has {have} "
                f"— pass one of them or re-export with --decode-chunk-sizes {decode_chunk_size}",
                field="decode_chunk_size")

    # -- stages ------------------------------------------------------------------------------------------------
    def decode_latents(self, latents, height, width, decode_chunk_size=None, progress=None):
        """[B, C, F, h, w] latents -> [B, 3, F, H, W] video, decoding ``decode_chunk_size`` frames at a time (VAE
        slicing; frames are independent, so the result does not depend on the slice)."""
        chunk = decode_chunk_size or max(self.artifact.buckets("vae_decoder", "chunk"))
        graph = self.artifact.graph("vae_decoder", chunk=chunk, height=height, width=width)
        latents = latents / self.artifact.constants["vae_scaling_factor"]
        b, c, f, h, w = latents.shape
        frames = latents.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        decoded = []
        for start in range(0, b * f, chunk):
            piece = frames[start:start + chunk]
            real = piece.shape[0]
            if real < chunk:  # the static graph takes exactly ``chunk`` frames: pad, then drop the padding
                piece = np.concatenate([piece, np.zeros((chunk - real, c, h, w), piece.dtype)])
            decoded.append(graph(latents=np.ascontiguousarray(piece))["sample"][:real])
            if progress:
                progress("decode")
        video = np.concatenate(decoded)
        return video.reshape(b, f, *video.shape[1:]).transpose(0, 2, 1, 3, 4).astype(np.float32)

    # -- call --------------------------------------------------------------------------------------------------
    def __call__(self, prompt=None, height=None, width=None, num_frames=None, num_inference_steps=None,
                 guidance_scale=None, negative_prompt=None, eta=None, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, output_type="np", callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), return_dict=True, decode_chunk_size=None,
                 cache_interval=None, progress=None):
        from framegraph.runtime.image import postprocess_video

        call = self.call_arguments(height=height, width=width, num_frames=num_frames,
                                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta)
        self.check_inputs(prompt, **call, cache_interval=cache_interval, output_type=output_type,
                          decode_chunk_size=decode_chunk_size,
                          prompt_embeds=prompt_embeds)
        height, width, num_frames = call["height"], call["width"], call["num_frames"]
        num_inference_steps, guidance_scale, eta = call["num_inference_steps"], call["guidance_scale"], call["eta"]
        for name in callback_on_step_end_tensor_inputs:
            if name != "latents":
                raise ValueError(f"callback_on_step_end_tensor_inputs may only name 'latents', got {name!r}")
        cfg = guidance_scale > 1.0
        rng = make_rng(generator)
        unet = self._unet_for_call(num_frames, cfg, height, width, cache_interval)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(prompt, cfg, negative_prompt, prompt_embeds,
                                                                   negative_prompt_embeds)
        embeds = np.concatenate([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
        n = prompt_embeds.shape[0]

        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        c = self.artifact.constants
        f = c["vae_scale_factor"]
        shape = (n, c["unet_in_channels"], num_frames, height // f, width // f)
        latents = randn(rng, shape) if latents is None else check_latents(latents, shape)
        latents = (latents * self.scheduler.init_noise_sigma).astype(np.float32)
        step_kwargs = {"eta": eta, "generator": rng} if "eta" in _step_parameters(self.scheduler) else {}

        self._prefetch_unet(unet)
        bar = ProgressBar(len(timesteps), progress, **self.progress_bar_config)
        for i, t in enumerate(timesteps):
            model_input = np.concatenate([latents] * 2) if cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t).astype(np.float32)
            noise_pred = self._unet({"sample": model_input, "encoder_hidden_states": embeds}, t, cfg, unet, i,
                                    last=i == len(timesteps) - 1)
            if cfg:
                uncond, text = noise_pred[:n], noise_pred[n:]
                noise_pred = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample.astype(np.float32)
            latents = self._step_callback(callback_on_step_end, i, t, latents)
            bar.step("denoise")
        self._release_unet(unet)

        if output_type == "latent":
            video = latents
        else:
            video = postprocess_video(self.decode_latents(latents, height, width, decode_chunk_size, bar.step),
                                      output_type)
        bar.close()
        if not return_dict:
            return (video,)
        return TextToVideoSDPipelineOutput(frames=video)


def _step_parameters(scheduler):
    import inspect

    return inspect.signature(scheduler.step).parameters
