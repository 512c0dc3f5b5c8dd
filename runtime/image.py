"""Image loading, pre- and postprocessing in numpy, numerically equal to diffusers' Stable Video Diffusion pipeline.

- :func:`clip_pixel_values`: the image encoder input of ``StableVideoDiffusionPipeline._encode_image`` (scale to
  [-1, 1], gaussian anti-alias blur, bicubic resize with ``align_corners=True`` as torch computes it, back to
  [0, 1], then CLIP mean/std normalisation).
- :func:`vae_pixel_values`: ``VideoProcessor.preprocess(image, height, width)``, the VAE encoder input in [-1, 1]
  (PIL images resized with Lanczos, numpy arrays with torch's default nearest-neighbour interpolation).
- :func:`postprocess_video`: ``VideoProcessor.postprocess_video`` for ``output_type`` "np" and "pil".

Images are PIL images, lists of them, or float arrays in [0, 1] shaped (H, W, 3) or (B, H, W, 3) (uint8 arrays are
read as 0..255). Non-RGB PIL images are converted to RGB.
"""

import io
import logging
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

logger = logging.getLogger(__name__)

CLIP_SIZE = 224
BICUBIC_A = -0.75  # torch's cubic convolution coefficient
URL_TIMEOUT_S = 60


# -- loading -------------------------------------------------------------------------------------------------------
def open_image(source, name, formats=None):
    """``PIL.Image.open(source)`` with its pixels read now; a file PIL cannot read is a ValueError that names
    ``name`` (PIL's own message shows the address of an in-memory buffer)."""
    try:
        with PIL.Image.open(source, formats=formats) as image:
            image.load()
            return image.copy() if image.mode == "RGB" else image.convert("RGB")
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        kinds = ", ".join(formats) if formats else "PNG, JPEG, WebP or another format PIL reads"
        reason = "not an image" if isinstance(exc, PIL.UnidentifiedImageError) else "a damaged image"
        raise ValueError(f"{name} is {reason} PIL can read; pass an image file ({kinds})") from None


def load_image(image):
    """An RGB PIL image from a PIL image, a file path or an http(s) URL (EXIF orientation applied, as diffusers)."""
    if isinstance(image, PIL.Image.Image):
        pil = image
    elif isinstance(image, (str, Path)):
        text = str(image)
        if text.startswith(("http://", "https://")):
            with urllib.request.urlopen(text, timeout=URL_TIMEOUT_S) as response:
                pil = open_image(io.BytesIO(response.read()), text)
        elif Path(text).is_file():
            pil = open_image(text, text)
        else:
            raise ValueError(f"{text!r} is neither an http(s) URL nor an existing file; pass a valid path or URL")
        pil = PIL.ImageOps.exif_transpose(pil)
    else:
        raise TypeError(
            f"load_image takes a PIL.Image.Image, a file path or an http(s) URL, got {type(image).__name__}"
        )
    return pil.convert("RGB") if pil.mode != "RGB" else pil


# -- input normalisation ---------------------------------------------------------------------------------------------
def _is_pil_list(images):
    return isinstance(images, (list, tuple)) and len(images) > 0 and all(
        isinstance(i, PIL.Image.Image) for i in images
    )


def _pil_list(images):
    """``images`` as a list of RGB PIL images, or None when they are arrays."""
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if _is_pil_list(images):
        return [i.convert("RGB") if i.mode != "RGB" else i for i in images]
    return None


def _float_array(images):
    """Arrays (H, W, 3), (B, H, W, 3) or a list of them -> float32 (B, H, W, 3) in [0, 1]."""
    if isinstance(images, (list, tuple)) and len(images) > 0 and all(isinstance(i, np.ndarray) for i in images):
        images = np.concatenate([i[None] if i.ndim == 3 else i for i in images], axis=0)
    if not isinstance(images, np.ndarray):
        raise TypeError(
            "images must be a PIL image, a list of PIL images, or a numpy array (H, W, 3) / (B, H, W, 3) in [0, 1]; "
            f"got {type(images).__name__} (use load_image() for paths and URLs)"
        )
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"image arrays must be (H, W, 3) or (B, H, W, 3) RGB, got shape {images.shape}")
    if images.ndim == 3:
        images = images[None]
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    images = images.astype(np.float32)
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"float image arrays must be in [0, 1], got values in [{low:.4g}, {high:.4g}]; rescale them (a [-1, 1] "
            "array x becomes x / 2 + 0.5)"
        )
    return images


def as_image_list(image):
    """The pipeline's ``image`` argument as a list with one image per batch element (PIL images or (H, W, 3) arrays).

    A PIL image or an (H, W, 3) array is a batch of one; a list, or a (B, H, W, 3) array, a batch of B.
    """
    pils = _pil_list(image)
    if pils is not None:
        return pils
    return list(_float_array(image))


def pil_to_numpy(images):
    """PIL image(s) -> float32 (B, H, W, 3) in [0, 1], as diffusers' ``VaeImageProcessor.pil_to_numpy``."""
    pils = _pil_list(images)
    if pils is None:
        raise TypeError(f"pil_to_numpy takes a PIL image or a list of them, got {type(images).__name__}")
    return np.stack([np.asarray(i).astype(np.float32) / np.float32(255.0) for i in pils], axis=0)


def to_numpy_images(images):
    """Any accepted image input -> float32 (B, H, W, 3) in [0, 1]."""
    return pil_to_numpy(images) if _pil_list(images) is not None else _float_array(images)


# -- CLIP path: anti-aliased bicubic resize --------------------------------------------------------------------------
def _gaussian_kernel(size, sigma):
    """Normalised 1-D gaussian of odd ``size`` (computed in float32, as torch does for float32 input)."""
    x = np.arange(size, dtype=np.float32) - np.float32(size // 2)
    sigma = np.float32(sigma)
    g = np.exp(-(x * x) / (np.float32(2.0) * sigma * sigma))
    return g / g.sum(dtype=np.float32)


def _reflect_index(i, n):
    """Index ``i`` reflected into [0, n) without repeating the edge (torch's "reflect" padding)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i = abs(i) % period
    return period - i if i >= n else i


def _blur_matrix(n, sigma, size):
    """(n, n) matrix applying a reflect-padded 1-D gaussian of odd ``size`` along an axis of length ``n``."""
    kernel = _gaussian_kernel(size, sigma).astype(np.float64)
    half = (size - 1) // 2
    matrix = np.zeros((n, n), dtype=np.float64)
    for out in range(n):
        for k in range(size):
            matrix[out, _reflect_index(out + k - half, n)] += kernel[k]
    return matrix


def _cubic_weights(t):
    """Keys cubic convolution weights (A = -0.75) for the 4 taps at offsets -1, 0, 1, 2 from floor(x).

    Computed in the dtype of ``t`` (float32 here, as torch computes them for float32 input).
    """
    a = t.dtype.type(BICUBIC_A)
    one = t.dtype.type(1.0)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=-1)


def _bicubic_matrix(n_in, n_out):
    """(n_out, n_in) matrix of torch's bicubic interpolation with ``align_corners=True`` (edge-clamped taps).

    Source positions and weights are computed in float32 as torch does for float32 input: in float64 the
    positions would differ by up to ~1e-5 pixel, which shows in the result wherever neighbouring pixels differ.
    """
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0.0)
    src = scale * np.arange(n_out, dtype=np.float32)
    base = np.clip(np.floor(src), 0, n_in - 1)
    weights = _cubic_weights(np.clip(src - base, np.float32(0.0), np.float32(1.0)))
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    for tap in range(4):
        index = np.clip(base.astype(np.int64) - 1 + tap, 0, n_in - 1)
        np.add.at(matrix, (np.arange(n_out), index), weights[:, tap].astype(np.float64))
    return matrix


def _antialias_params(n_in, n_out):
    """Sigma and odd kernel size of diffusers' ``_resize_with_antialiasing`` for one axis."""
    sigma = max((n_in / n_out - 1.0) / 2.0, 0.001)
    size = int(max(2.0 * 2 * sigma, 3))
    return sigma, size + 1 if size % 2 == 0 else size


def resize_with_antialiasing(images, size):
    """float (B, H, W, C) -> float32 (B, h, w, C): gaussian blur, then bicubic (align_corners=True) resize.

    The same operator as diffusers' ``_resize_with_antialiasing`` (kornia's recipe), written as one resampling
    matrix per axis and computed in float64.
    """
    images = np.asarray(images)
    out_h, out_w = size
    in_h, in_w = images.shape[1:3]
    rows = _bicubic_matrix(in_h, out_h) @ _blur_matrix(in_h, *_antialias_params(in_h, out_h))
    cols = _bicubic_matrix(in_w, out_w) @ _blur_matrix(in_w, *_antialias_params(in_w, out_w))
    out = np.einsum("hH,bHWc,wW->bhwc", rows, images.astype(np.float64), cols, optimize=True)
    return out.astype(np.float32)


def clip_pixel_values(images, mean, std, size=CLIP_SIZE):
    """The CLIP image encoder input of Stable Video Diffusion: float32 (B, 3, size, size).

    ``mean`` / ``std`` are the feature extractor's ``image_mean`` / ``image_std`` (preprocessor_config.json).
    Note: diffusers divides numpy-array input by 255 a second time here (it routes arrays through
    ``pil_to_numpy``); this function reads arrays in [0, 1] as images, as the pipeline documents.
    """
    pixels = to_numpy_images(images)
    pixels = pixels * np.float32(2.0) - np.float32(1.0)
    pixels = resize_with_antialiasing(pixels, (size, size))
    pixels = (pixels + np.float32(1.0)) / np.float32(2.0)
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    std = np.asarray(std, dtype=np.float32).reshape(-1)
    if mean.shape != (3,) or std.shape != (3,):
        raise ValueError(f"mean and std need 3 values (one per RGB channel), got {mean.tolist()} and {std.tolist()}")
    pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)


# -- VAE path --------------------------------------------------------------------------------------------------------
def _nearest_indices(n_in, n_out):
    """Source indices of torch's default ``interpolate(mode="nearest")`` (float32 scale, floor)."""
    if n_in == n_out:
        return np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    index = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, n_in - 1)


def vae_pixel_values(images, height, width, vae_scale_factor=8):
    """The VAE encoder input, as diffusers' ``VideoProcessor.preprocess(image, height, width)``: float32 (B, 3, H, W).

    Values in [-1, 1]. ``height`` and ``width`` are rounded down to multiples of ``vae_scale_factor``, as diffusers
    does. PIL images are resized with Lanczos (the processor's default); arrays with nearest neighbour.
    """
    h, w = (int(v) - int(v) % vae_scale_factor for v in (height, width))
    if (h, w) != (int(height), int(width)):
        logger.warning("size %dx%d rounded down to %dx%d (multiples of %d), as diffusers does",
                       width, height, w, h, vae_scale_factor)
    if h <= 0 or w <= 0:
        raise ValueError(f"height={height}, width={width} must be at least vae_scale_factor={vae_scale_factor}")
    pils = _pil_list(images)
    if pils is not None:
        pixels = pil_to_numpy([i.resize((w, h), resample=PIL.Image.LANCZOS) for i in pils])
    else:
        pixels = _float_array(images)
        pixels = pixels[:, _nearest_indices(pixels.shape[1], h)][:, :, _nearest_indices(pixels.shape[2], w)]
    pixels = np.float32(2.0) * pixels - np.float32(1.0)
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)


# -- postprocessing --------------------------------------------------------------------------------------------------
def numpy_to_pil(images):
    """float (N, H, W, 3) in [0, 1] -> list of PIL images (rounded to uint8, as diffusers)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    pixels = (images * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(p) for p in pixels]


def _postprocess_np(video):
    frames = video * np.float32(0.5) + np.float32(0.5)
    return np.clip(frames, 0.0, 1.0).transpose(0, 2, 3, 4, 1).astype(np.float32)


def _postprocess_pil(video):
    return [numpy_to_pil(v) for v in _postprocess_np(video)]


POSTPROCESSORS = {"np": _postprocess_np, "pil": _postprocess_pil}


def postprocess_video(video, output_type="np"):
    """Decoded video (B, C, F, H, W) in [-1, 1] -> frames, as diffusers' ``VideoProcessor.postprocess_video``.

    "np": float32 (B, F, H, W, C) in [0, 1]; "pil": one list of PIL images per video.
    """
    video = np.asarray(video, dtype=np.float32)
    if video.ndim != 5:
        raise ValueError(f"video must be (batch, channels, frames, height, width), got shape {video.shape}")
    try:
        postprocess = POSTPROCESSORS[output_type]
    except KeyError:
        raise ValueError(
            f"output_type {output_type!r} is not supported by the numpy runtime; choose one of {sorted(POSTPROCESSORS)}"
        ) from None
    return postprocess(video)
