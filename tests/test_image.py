"""Image loading and the numpy pre/postprocessing of Stable Video Diffusion, against diffusers' reference values."""

import io
import json
import logging

import numpy as np
import PIL.Image
import pytest

from framegraph.runtime import image as fi

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    folder = fixtures_dir / "preprocess"
    with open(folder / "reference.json", encoding="utf-8") as f:
        meta = json.load(f)
    return folder, meta, dict(np.load(folder / "reference.npz"))


def random_image(rng, height, width):
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- load_image -------------------------------------------------------------------------------------------------
def test_load_image_from_pil_path_and_url(tmp_path, monkeypatch):
    rgba = PIL.Image.new("RGBA", (5, 4), (10, 20, 30, 40))
    assert fi.load_image(rgba).mode == "RGB"
    path = tmp_path / "in.png"
    rgba.save(path)
    for source in (path, str(path)):
        loaded = fi.load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (5, 4) and loaded.getpixel((0, 0)) == (10, 20, 30)

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    opened = []

    def fake_urlopen(url, timeout):
        opened.append(url)
        return Response(path.read_bytes())

    monkeypatch.setattr(fi.urllib.request, "urlopen", fake_urlopen)
    assert fi.load_image("https://example.com/in.png").size == (5, 4)
    assert opened == ["https://example.com/in.png"]


def test_load_image_errors(tmp_path):
    with pytest.raises(TypeError, match="load_image takes a PIL.Image.Image, a file path or an http"):
        fi.load_image(42)
    with pytest.raises(ValueError, match="neither an http"):
        fi.load_image(str(tmp_path / "missing.png"))


# -- CLIP path --------------------------------------------------------------------------------------------------
def test_clip_pixel_values_match_diffusers(reference):
    folder, meta, ref = reference
    index = ref["clip_index"]
    for case, spec in meta["cases"].items():
        images = [PIL.Image.open(folder / name) for name in spec["images"]]
        out = fi.clip_pixel_values(images, meta["image_mean"], meta["image_std"])
        assert out.shape == (len(images), 3, 224, 224) and out.dtype == np.float32
        err = np.abs(out[:, :, index][:, :, :, index] - ref[f"clip.{case}"]).max()
        assert err <= 1e-5, f"{case}: CLIP pixel values differ from diffusers by {err:.2e}"


def test_clip_accepts_pil_lists_and_arrays():
    rng = np.random.default_rng(0)
    images = [random_image(rng, 40, 56) for _ in range(2)]
    as_uint8 = np.stack([np.asarray(i) for i in images])
    as_float = as_uint8.astype(np.float32) / 255
    batch = fi.clip_pixel_values(images, MEAN, STD)
    assert batch.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(fi.clip_pixel_values(images[0], MEAN, STD), batch[:1])
    np.testing.assert_array_equal(fi.clip_pixel_values(as_float, MEAN, STD), batch)
    np.testing.assert_array_equal(fi.clip_pixel_values(as_uint8, MEAN, STD), batch)
    np.testing.assert_array_equal(fi.clip_pixel_values(as_float[1], MEAN, STD), batch[1:])
    np.testing.assert_array_equal(fi.clip_pixel_values(list(as_float), MEAN, STD), batch)


def test_as_image_list_gives_one_entry_per_batch_element():
    rng = np.random.default_rng(3)
    image = random_image(rng, 8, 8)
    assert fi.as_image_list(image) == [image]
    assert len(fi.as_image_list([image, image])) == 2
    assert len(fi.as_image_list(np.zeros((8, 8, 3), np.float32))) == 1
    batch = fi.as_image_list(np.zeros((3, 8, 8, 3), np.float32))
    assert len(batch) == 3 and batch[0].shape == (8, 8, 3)
    np.testing.assert_array_equal(fi.vae_pixel_values(batch, 8, 8), fi.vae_pixel_values(np.stack(batch), 8, 8))


def test_clip_constant_image_and_identity_size():
    gray = np.full((1, 300, 500, 3), 0.25, dtype=np.float32)
    out = fi.clip_pixel_values(gray, MEAN, STD)
    expected = (np.float32(0.25) - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_allclose(out[0].transpose(1, 2, 0), np.broadcast_to(expected, (224, 224, 3)), atol=1e-6)
    rng = np.random.default_rng(1)
    exact = rng.random((1, 224, 224, 3)).astype(np.float32)  # 224 px: no blur, no resampling
    out = fi.clip_pixel_values(exact, [0, 0, 0], [1, 1, 1])
    np.testing.assert_allclose(out[0].transpose(1, 2, 0), exact[0], atol=1e-6)


def test_resize_with_antialiasing_removes_aliasing():
    checker = (np.indices((896, 896)).sum(0) % 2).astype(np.float32)  # 1-pixel checkerboard
    images = np.repeat(checker[None, :, :, None], 3, axis=-1)
    smoothed = fi.resize_with_antialiasing(images, (224, 224))
    assert smoothed.shape == (1, 224, 224, 3) and smoothed.dtype == np.float32
    assert abs(float(smoothed.mean()) - 0.5) < 1e-3 and float(smoothed.std()) < 0.02
    step = np.repeat((np.arange(8) >= 4).astype(np.float32)[None, None, :, None], 8, axis=1)
    upsampled = fi.resize_with_antialiasing(np.repeat(step, 3, axis=-1), (224, 224))
    assert upsampled.min() < -0.05 and upsampled.max() > 1.05  # bicubic rings at edges, as torch's does


def test_clip_rejects_bad_inputs():
    with pytest.raises(TypeError, match="use load_image"):
        fi.clip_pixel_values("image.png", MEAN, STD)
    with pytest.raises(ValueError, match=r"in \[0, 1\], got values in \[-1"):
        fi.clip_pixel_values(np.full((8, 8, 3), -1.0, np.float32), MEAN, STD)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) or \(B, H, W, 3\) RGB, got shape \(8, 8, 4\)"):
        fi.clip_pixel_values(np.zeros((8, 8, 4), np.float32), MEAN, STD)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        fi.clip_pixel_values(np.zeros((8, 8, 3), np.float32), [0.5], [0.5])


# -- VAE path ---------------------------------------------------------------------------------------------------
def test_vae_pixel_values_match_diffusers(reference):
    folder, meta, ref = reference
    for case, spec in meta["cases"].items():
        images = [PIL.Image.open(folder / name) for name in spec["images"]]
        out = fi.vae_pixel_values(images, spec["vae_height"], spec["vae_width"])
        np.testing.assert_array_equal(out, ref[f"vae.{case}"], err_msg=f"{case} (PIL input)")
        arrays = np.stack([np.asarray(i).astype(np.float32) / 255.0 for i in images])
        out = fi.vae_pixel_values(arrays, spec["vae_height"], spec["vae_width"])
        np.testing.assert_array_equal(out, ref[f"vae_np.{case}"], err_msg=f"{case} (array input)")


def test_vae_pixel_values_shape_range_and_lanczos():
    rng = np.random.default_rng(2)
    image = random_image(rng, 50, 70)
    out = fi.vae_pixel_values(image, 32, 48)
    assert out.shape == (1, 3, 32, 48) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    manual = np.asarray(image.resize((48, 32), resample=PIL.Image.LANCZOS)).astype(np.float32) / 255
    np.testing.assert_array_equal(out[0].transpose(1, 2, 0), manual * 2 - 1)


def test_vae_size_is_rounded_down_to_the_vae_scale_factor(caplog):
    image = np.zeros((40, 40, 3), np.float32)
    with caplog.at_level(logging.WARNING):
        assert fi.vae_pixel_values(image, 37, 45).shape == (1, 3, 32, 40)
    assert "rounded down to 40x32" in caplog.text
    with pytest.raises(ValueError, match="must be at least vae_scale_factor=8"):
        fi.vae_pixel_values(image, 7, 16)


# -- postprocessing ---------------------------------------------------------------------------------------------
def test_postprocess_video_matches_diffusers(reference):
    _, _, ref = reference
    frames = fi.postprocess_video(ref["post.video"], "np")
    assert frames.dtype == np.float32 and frames.shape == ref["post.np"].shape
    np.testing.assert_array_equal(frames, ref["post.np"])
    pil = fi.postprocess_video(ref["post.video"], "pil")
    assert len(pil) == ref["post.pil"].shape[0] and all(len(v) == ref["post.pil"].shape[1] for v in pil)
    np.testing.assert_array_equal(np.stack([np.stack([np.asarray(f) for f in v]) for v in pil]), ref["post.pil"])


def test_postprocess_video_shapes_and_errors():
    video = np.linspace(-2, 2, 2 * 3 * 4 * 5 * 6, dtype=np.float32).reshape(2, 3, 4, 5, 6)  # (B, C, F, H, W)
    frames = fi.postprocess_video(video)
    assert frames.shape == (2, 4, 5, 6, 3) and frames.min() == 0.0 and frames.max() == 1.0
    pil = fi.postprocess_video(video, output_type="pil")
    assert len(pil) == 2 and len(pil[0]) == 4 and pil[0][0].size == (6, 5) and pil[0][0].mode == "RGB"
    with pytest.raises(ValueError, match=r"output_type 'pt' is not supported .* \['np', 'pil'\]"):
        fi.postprocess_video(video, output_type="pt")
    with pytest.raises(ValueError, match=r"\(batch, channels, frames, height, width\)"):
        fi.postprocess_video(video[0])
