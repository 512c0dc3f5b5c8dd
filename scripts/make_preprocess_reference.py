"""Write tests/fixtures/preprocess/: reference pre/postprocessing values computed with diffusers.

Needs the reference toolchain (never a runtime dependency):
    pip install torch==2.13.0 && pip install --no-deps diffusers==0.42.1
    python scripts/make_preprocess_reference.py

Writes the input images as PNG files and ``reference.npz`` with, per case:
- ``clip.<case>``: StableVideoDiffusionPipeline._encode_image's CLIP input (before the image encoder), sampled on
  the grid ``clip_index`` of rows and columns to keep the file small;
- ``vae.<case>``: VideoProcessor.preprocess(image, height, width) for the PIL images and for the same images given as
  float arrays in [0, 1] (``vae_np.<case>``);
- ``post.video`` -> ``post.np`` / ``post.pil``: VideoProcessor.postprocess_video for "np" and "pil".
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import __version__ as diffusers_version
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
from diffusers.video_processor import VideoProcessor
from transformers import CLIPImageProcessor

logger = logging.getLogger("make_preprocess_reference")

ROOT = Path(__file__).resolve().parents[1]
FEATURE_EXTRACTOR = ROOT / "tests" / "fixtures" / "svd-tiny" / "pipeline" / "feature_extractor"
OUT = ROOT / "tests" / "fixtures" / "preprocess"

# case -> (image height, width, number of images, VAE height, width)
CASES = {
    "upsample": (24, 40, 2, 32, 48),  # CLIP upsamples (sigma 0.001, 3-tap blur is the identity)
    "mixed": (96, 400, 1, 64, 120),  # upsample in height, 1.8x downsample in width
    "downsample": (680, 300, 1, 72, 32),  # 3.0x / 1.3x downsample: 5- and 3-tap blurs
}
CLIP_INDEX = np.r_[0:224:7, 223]


def synthetic_image(rng, height, width):
    """Smooth colour gradients, a sharp edge and a noisy band: exercises blur, interpolation and clamping."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), 0.5 + 0.5 * np.sin(xx / 5.0 + yy / 7.0)], -1)
    base[(xx > width / 3) & (yy < height / 2)] = [1.0, 1.0, 1.0]
    noise = rng.normal(0.0, 12.0, base.shape) * (yy < 48)[..., None]  # noise in a band only keeps the PNG small
    noisy = base * 255 + noise
    return PIL.Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def clip_reference(images, video_processor, feature_extractor):
    """StableVideoDiffusionPipeline._encode_image up to the image encoder (diffusers 0.42.1)."""
    pixels = video_processor.numpy_to_pt(video_processor.pil_to_numpy(images))
    pixels = _resize_with_antialiasing(pixels * 2.0 - 1.0, (224, 224))
    pixels = (pixels + 1.0) / 2.0
    return feature_extractor(
        images=pixels, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False,
        return_tensors="pt",
    ).pixel_values.numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(20240601)
    video_processor = VideoProcessor(do_resize=True, vae_scale_factor=8)
    feature_extractor = CLIPImageProcessor.from_pretrained(FEATURE_EXTRACTOR)
    arrays = {"clip_index": CLIP_INDEX}
    meta = {"diffusers": diffusers_version, "torch": torch.__version__, "cases": {},
            "image_mean": list(feature_extractor.image_mean), "image_std": list(feature_extractor.image_std)}

    for case, (height, width, count, vae_height, vae_width) in CASES.items():
        images = [synthetic_image(rng, height, width) for _ in range(count)]
        files = []
        for i, image in enumerate(images):
            name = f"{case}_{i}.png"
            image.save(args.out / name)
            files.append(name)
        clip = clip_reference(images, video_processor, feature_extractor)
        arrays[f"clip.{case}"] = clip[:, :, CLIP_INDEX][:, :, :, CLIP_INDEX]
        vae = video_processor.preprocess(images, height=vae_height, width=vae_width).numpy()
        as_float = np.stack([np.asarray(i).astype(np.float32) / 255.0 for i in images])
        vae_np = video_processor.preprocess(as_float, height=vae_height, width=vae_width).numpy()
        arrays[f"vae.{case}"] = vae
        arrays[f"vae_np.{case}"] = vae_np
        meta["cases"][case] = {"images": files, "vae_height": vae_height, "vae_width": vae_width}
        logger.info("%s: %d image(s) %dx%d -> clip %s, vae %s", case, count, width, height, clip.shape, vae.shape)

    video = rng.normal(0.0, 0.7, (2, 3, 3, 8, 12)).astype(np.float32)
    arrays["post.video"] = video
    arrays["post.np"] = video_processor.postprocess_video(torch.from_numpy(video), output_type="np")
    pil = video_processor.postprocess_video(torch.from_numpy(video), output_type="pil")
    arrays["post.pil"] = np.stack([np.stack([np.asarray(frame) for frame in frames]) for frames in pil])

    np.savez_compressed(args.out / "reference.npz", **arrays)
    with open(args.out / "reference.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
