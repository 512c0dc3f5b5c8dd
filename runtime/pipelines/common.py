"""Small pieces shared by the pipelines: seeded noise, argument checks, batching, progress."""

import logging

import numpy as np

from framegraph.runtime.params import InvalidRequestError, Param, brief

logger = logging.getLogger(__name__)


def make_rng(generator):
    """``generator``: None (fresh entropy), an int seed, or a ``numpy.random.Generator``."""
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool) and generator >= 0:
        return np.random.default_rng(int(generator))
    raise TypeError(f"generator must be a non-negative int seed or a numpy.random.Generator, got {generator!r}")


def randn(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def check_latents(latents, shape):
    latents = np.asarray(latents)
    if latents.shape != tuple(shape):
        raise ValueError(f"latents must have shape {tuple(shape)}, got {latents.shape}")
    if not np.issubdtype(latents.dtype, np.floating) or not np.all(np.isfinite(latents)):
        raise ValueError("latents must be a finite floating-point array")
    return latents.astype(np.float32)


def chunks(array, size):
    """Split along axis 0 into pieces of exactly ``size`` (graphs have a static batch)."""
    if len(array) % size:
        raise ValueError(f"batch of {len(array)} is not a multiple of the exported graph batch {size}")
    return [array[i:i + size] for i in range(0, len(array), size)]


# The size and length of a video, declared once for both pipelines (their defaults are the artifact's).
VIDEO_PARAMS = (
    Param("height", "int", minimum=8, maximum=4096, help="video height (default: the artifact's)"),
    Param("width", "int", minimum=8, maximum=4096, help="video width (default: the artifact's)"),
    Param("num_frames", "int", minimum=1, maximum=1024, help="frames of the video (default: the artifact's)"),
)


# Step caching (DeepCache), declared once for both pipelines.
CACHE_PARAM = Param(
    "cache_interval", "int", minimum=1, maximum=1000,
    help="step caching: run the whole UNet every N-th step and, in between, only its shallow part on the deep "
    "features cached at the last whole step (faster, slightly different frames; needs an artifact exported with "
    "--cache-branch; default 1: off)")
# the graphs of step caching (export/step_cache.py)
DEEP_GRAPH, SHALLOW_GRAPH, FEATURE = "unet_deep", "unet_shallow", "deep_features"


def check_cache(artifact, cache_interval):
    """Refuse a ``cache_interval`` above 1 on an artifact without step-caching graphs."""
    if cache_interval is not None and cache_interval > 1 and not artifact.buckets(DEEP_GRAPH, "num_frames"):
        raise InvalidRequestError(
            f"cache_interval={brief(cache_interval)} needs the step-caching UNet graphs, which this artifact lacks: "
            "re-export it with svd-export --cache-branch B (e.g. 0), or pass cache_interval 1", field=CACHE_PARAM.name)


class StepUNet:
    """The UNet of one pipeline call: which graph each denoising step runs and the features cached between steps.

    ``cache_interval`` 1 runs the ``unet`` graph every step. Above 1 (DeepCache's uniform schedule), steps 0, N, 2N,
    ... run ``unet_deep`` (the whole UNet, which also returns the deep features) and the steps in between run
    ``unet_shallow`` on the features of the last deep step, one set per graph batch. Outside low-memory mode the
    graphs are opened once and held for the call."""

    def __init__(self, artifact, bucket, cache_interval=None):
        self.artifact, self.bucket = artifact, bucket
        self.interval = 1 if cache_interval is None else int(cache_interval)
        self.names = ("unet",) if self.interval == 1 else (DEEP_GRAPH, SHALLOW_GRAPH)
        self.held = None if artifact.low_memory else {name: artifact.graph(name, **bucket) for name in self.names}
        self.features = {}

    def graph(self, name):
        return self.held[name] if self.held is not None else self.artifact.graph(name, **self.bucket)

    def run(self, step, chunk, feeds, shrink=False):
        """noise_pred of step ``step`` for the graph batch starting at video ``chunk``."""
        if self.interval == 1:
            return self.graph("unet").run(feeds, shrink=shrink)["noise_pred"]
        if step % self.interval == 0:
            outputs = self.graph(DEEP_GRAPH).run(feeds, shrink=shrink)
            self.features[chunk] = outputs[FEATURE]
            return outputs["noise_pred"]
        feeds = dict(feeds, **{FEATURE: self.features[chunk]})
        return self.graph(SHALLOW_GRAPH).run(feeds, shrink=shrink)["noise_pred"]

    def prefetch_memory(self):
        """Bring the held graphs' weight pages in (see ``Graph.prefetch_memory``); bytes brought in."""
        return sum(graph.prefetch_memory() or 0 for graph in (self.held or {}).values())

    def release_memory(self):
        """Give the held graphs' mapped weight pages back (see ``Graph.release_memory``); bytes given back."""
        return sum(graph.release_memory() or 0 for graph in (self.held or {}).values())


def declared_call(params, arguments):
    """Check ``arguments`` (resolved call arguments, typed) against their declarations in ``params``; None values
    and undeclared names are left to the caller."""
    by_name = {p.name: p for p in params}
    for name, value in arguments.items():
        if value is not None and name in by_name:
            by_name[name].check(value)


def check_size(artifact, height, width):
    """Refuse a (height, width) the artifact's UNet was not exported for."""
    sizes = sorted({(g.bucket["height"], g.bucket["width"]) for g in artifact.manifest.graphs
                    if g.name == "unet" and g.format == artifact.format})
    if (height, width) not in sizes:
        raise InvalidRequestError(
            f"height={brief(height)}, width={brief(width)} has no exported bucket; available: "
            f"{', '.join(f'{h}x{w}' for h, w in sizes)} — pass one of them, or export an artifact for that size "
            "with svd-export --height/--width (it tells which sizes the model accepts)", field="height")


def check_frames(artifact, num_frames):
    """Refuse a frame count the artifact's UNet was not exported for."""
    frames = artifact.buckets("unet", "num_frames")
    if num_frames not in frames:
        raise InvalidRequestError(
            f"num_frames={brief(num_frames)} has no exported bucket; available: "
            f"{', '.join(map(str, frames))} — pass one of them or re-export with --frames {brief(num_frames)}",
            field="num_frames")


class ProgressBar:
    """A tqdm bar (unless disabled) plus an optional ``progress(kind)`` callback per step / decode chunk."""

    def __init__(self, total, callback=None, disable=None, **tqdm_kwargs):
        self.callback = callback
        self.bar = None
        if not disable:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, **tqdm_kwargs)

    def step(self, kind):
        if self.bar is not None and kind == "denoise":
            self.bar.update(1)
        if self.callback is not None:
            self.callback(kind)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class ArtifactPipeline:
    """What the pipelines share: opening an artifact folder of their ``kind`` and the progress bar settings.
    Subclasses build themselves from the opened artifact in ``_from_artifact``."""

    kind = None
    # the call's arguments (``Param``s): names, kinds, ranges, diffusers' defaults, help; the engine, the HTTP
    # server and the CLI take theirs from here
    call_params = ()
    # the Param of the written video's frames per second (a call argument, or only the video's)
    video_fps_param = None
    # the Param of the call's first argument (the conditioning image, the prompt)
    input_param = None

    def for_thread(self):
        """The pipeline one thread uses for all its calls: a copy of whatever is not thread-safe (the graphs are
        shared: ONNX Runtime's runs are thread-safe)."""
        return self

    def request(self, arguments):
        """Parsed request arguments (``input_param``'s, the call's, the video's fps) as a resolved call: the
        artifact's defaults filled in (``call_arguments``), the video's frame rate set. ``check_request`` checks
        it, ``work`` counts it, ``__call__`` runs it once the video-only arguments are left out (``call_of``)."""
        call = dict(arguments)
        call.update(self.call_arguments(**{name: call.get(name) for name in self.defaulted()}))
        if call.get(self.video_fps_param.name) is None:
            call[self.video_fps_param.name] = self.video_fps_param.default
        call.setdefault("output_type", "np")
        return call

    def call_of(self, request):
        """The keyword arguments of ``__call__`` in a resolved request (the video-only frame rate left out)."""
        video = self.video_fps_param
        if video in self.call_params:
            return dict(request)
        return {name: value for name, value in request.items() if name != video.name}

    def check_request(self, request):
        """``check_inputs`` on a resolved request."""
        raise NotImplementedError

    def work(self, request):
        """(denoising steps, decode chunks) of a checked request, for progress reports."""
        raise NotImplementedError

    # diffusers' defaults of ``call_params`` (those declared with one), as the export writes them into the manifest
    call_defaults = {}

    @classmethod
    def defaulted(cls):
        """Names of the arguments whose None means the artifact's or diffusers' default (``call_arguments``)."""
        return tuple(dict.fromkeys([p.name for p in VIDEO_PARAMS] + list(cls.call_defaults)))

    def call_arguments(self, **arguments):
        """``arguments`` with every None filled in: from the artifact's manifest ``defaults`` first (the sizes and
        frame count it was exported for), then from ``call_defaults``. The one place call defaults come from."""
        resolved = dict(arguments)
        for name, value in arguments.items():
            if value is None:
                found = self.artifact.defaults.get(name)
                resolved[name] = self.call_defaults.get(name) if found is None else found
        return resolved

    @classmethod
    def from_artifacts(cls, path, backend="onnxruntime", providers=None, device=None, num_threads=None,
                       verify=True, low_memory=False, resident_buckets=1, split_guidance=False, **backend_options):
        """Open an exported artifact folder. ``low_memory=True`` keeps one graph loaded at a time (peak memory of
        the largest graph, not the sum); ``resident_buckets`` (default 1) is how many frame buckets of the UNet stay
        loaded (the least recently used is closed first; None: all); ``split_guidance=True`` runs guidance's two
        halves as two UNet runs (half the UNet's working memory, see Artifact); ``backend_options`` (``providers``,
        ``device``, ``num_threads``, engine-specific ones such as ``share_weights``) go to the backend, and those
        left at None take the backend's defaults. ``verify`` (True, "full" or False) is the check of the artifact's
        files, see :func:`framegraph.runtime.manifest.verify_files`."""
        from framegraph.runtime.artifact import Artifact

        options = {k: v for k, v in dict(backend_options, providers=providers, device=device,
                                         num_threads=num_threads).items() if v is not None}
        artifact = Artifact(path, cls.kind, backend, verify=verify, low_memory=low_memory,
                            resident_buckets=resident_buckets, split_guidance=split_guidance, **options)
        return cls._from_artifact(artifact)

    @classmethod
    def _from_artifact(cls, artifact):
        raise NotImplementedError

    def set_progress_bar_config(self, **kwargs):
        self.progress_bar_config = kwargs

    def _unet(self, batched, t, cfg, unet, step, last=False):
        """Run the call's UNet (``unet``, a StepUNet) for denoising step ``step`` at timestep ``t`` on ``batched``
        (its other inputs by name, each [2N or N, ...]: with guidance the unconditional half first), graph batch by
        graph batch; ``last``: the denoising loop's last step, whose last run gives the UNet's working memory back
        (``Graph.run(shrink=True)``)."""
        n = len(batched["sample"]) // (2 if cfg else 1)
        timestep = np.asarray(t, dtype=np.float32).reshape(())
        split = cfg and self.artifact.split_guidance  # each half of a guidance batch is a run of its own
        # the runs as (first video of the run in ``batched``, indices); a guidance graph batch holds both halves
        runs = []
        for start in range(0, n, self.batch):
            idx = np.arange(start, start + self.batch)
            if split:
                runs += [(start, idx), (start + n, idx + n)]
            else:
                runs.append((start, np.concatenate([idx, idx + n]) if cfg else idx))
        outputs = []
        for number, (first, idx) in enumerate(runs):
            feeds = {name: value[idx] for name, value in batched.items()}
            feeds["timestep"] = timestep
            outputs.append(unet.run(step, first, feeds, shrink=last and number == len(runs) - 1))
        if split:  # the unconditional halves first, as in a guidance batch
            return np.concatenate(outputs[0::2] + outputs[1::2])
        if not cfg:
            return np.concatenate(outputs)
        half = self.batch
        return np.concatenate([o[:half] for o in outputs] + [o[half:] for o in outputs])

    def _step_callback(self, callback_on_step_end, i, t, latents):
        """diffusers' ``callback_on_step_end(pipe, step, timestep, {"latents": ...})``, which may replace the
        latents; the latents to go on with."""
        if callback_on_step_end is None:
            return latents
        outputs = callback_on_step_end(self, i, t, {"latents": latents}) or {}
        return outputs.pop("latents", latents)

    def unet_batch(self, cfg):
        """The batch of the UNet graph a call runs: guidance doubles it, unless its halves run apart
        (``split_guidance``)."""
        return self.batch * (2 if cfg and not self.artifact.split_guidance else 1)

    def _unet_for_call(self, num_frames, cfg, height, width, cache_interval=None):
        """The call's StepUNet: the UNet bucket (guidance doubles the graph batch) and, with ``cache_interval`` > 1,
        its step-caching graphs (None: 1).

        Outside low-memory mode its graphs are held from the call's start to its end, so that calls running at once
        with other frame counts cannot close them between steps (``resident_buckets``). They are opened before the
        encoders run: where they replace another bucket, the call's peak memory then stays that of a call without
        a switch (see docs/performance.md)."""
        bucket = dict(num_frames=num_frames, batch=self.unet_batch(cfg), height=height, width=width)
        return StepUNet(self.artifact, bucket, cache_interval)

    @staticmethod
    def _prefetch_unet(unet):
        """Bring the held UNet graphs' weight pages in before the first step, in one pass rather than a page fault
        at a time (see docs/performance.md). Called after the encoders gave their pages back, so the call's peak
        memory stays the denoising loop's; in low-memory mode (nothing held) the pages come in on first use."""
        size = unet.prefetch_memory()
        if size:
            logger.debug("brought in %.2f GB of UNet weight pages", size / 1e9)

    @staticmethod
    def _release_unet(unet):
        """Give the held UNet graphs' mapped weight pages back after the last step, so that the decode's peak
        memory does not hold them (the kernel keeps them in its page cache; the next call's ``_prefetch_unet``
        brings them in again in one pass). Pages of weights ONNX Runtime copied or packed stay."""
        size = unet.release_memory()
        if size:
            logger.debug("gave back %.2f GB of UNet weight pages before the decode", size / 1e9)
