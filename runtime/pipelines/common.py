"""Small pieces shared by the pipelines: seeded noise, argument checks, batching, progress."""

import logging

import numpy as np

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


def open_artifact(path, kind, backend, verify=True, low_memory=False, resident_buckets=1,
                  **backend_options):
    """The pipelines' ``from_artifacts`` arguments -> an :class:`~framegraph.runtime.artifact.Artifact`.

    ``backend_options`` (``providers``, ``device``, ``num_threads``, engine-specific ones) go to the backend;
    those left at None take the backend's defaults."""
    from framegraph.runtime.artifact import Artifact

    options = {k: v for k, v in backend_options.items() if v is not None}
    return Artifact(path, kind, backend, verify=verify, low_memory=low_memory, resident_buckets=resident_buckets,
                    **options)
