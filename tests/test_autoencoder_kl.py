"""AutoencoderKL (the text-to-video image VAE) against diffusers' golden outputs: fp32, fp16, ONNX, parameter count.

The golden ``vae_decode.latents`` are what ``vae.decode`` receives: already divided by ``scaling_factor``.
"""

import numpy as np
import pytest

from helpers import assert_close_scaled, onnx_roundtrip

FP16_REL = 5e-2


@pytest.fixture(scope="module")
def vae_cls(ms):
    from framegraph.models import autoencoder_kl as module

    return module


@pytest.fixture(scope="module")
def vae32(vae_cls, t2v_tiny):
    from framegraph.models.loading import load_component

    return load_component(vae_cls.AutoencoderKL, t2v_tiny / "vae")


@pytest.fixture(scope="module")
def vae16(vae_cls, t2v_tiny):
    from framegraph.models.loading import load_component

    return load_component(vae_cls.AutoencoderKL, t2v_tiny / "vae", variant="fp16", dtype="float16")


@pytest.fixture(scope="module")
def images(t2v_golden):
    """Encoder inputs: the golden decoded frames (values near [-1, 1]), [4, 3, 32, 32]."""
    return np.ascontiguousarray(t2v_golden["vae_decode.sample"], dtype=np.float32)


def _run(ms, net, x, dtype=np.float32):
    return net(ms.Tensor(np.asarray(x, dtype=dtype))).asnumpy().astype(np.float32)


def test_parameter_names_are_checkpoint_keys(vae32, t2v_tiny):
    from framegraph.models.loading import model_parameters, read_state_dict

    keys = set(read_state_dict(t2v_tiny / "vae"))
    assert set(model_parameters(vae32)) == keys
    assert {k.split(".")[0] for k in keys} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}


def test_config(vae_cls, vae32, fixtures_dir):
    from framegraph.models.loading import config_from_dict, read_config

    assert vae32.config.vae_scale_factor == 1 and vae32.config.norm_num_groups == 2
    assert vae32.config.scaling_factor == pytest.approx(0.18215)
    real_config = read_config(fixtures_dir / "configs/text-to-video-ms-1.7b/vae")
    real = config_from_dict(vae_cls.AutoencoderKLConfig, real_config)
    assert real.vae_scale_factor == 8 and real.use_quant_conv and real.use_post_quant_conv


def test_without_quant_convs(vae_cls, ms):
    """use_quant_conv / use_post_quant_conv = False drop the two 1x1 convolutions and their keys."""
    from framegraph.models.loading import model_parameters

    config = {"block_out_channels": [8], "norm_num_groups": 2, "use_quant_conv": False, "use_post_quant_conv": False}
    vae = vae_cls.AutoencoderKL.from_config(config)
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in model_parameters(vae))
    out = _run(ms, vae_cls.VaeDecoderGraph(vae), np.zeros((1, 4, 8, 8)))
    assert out.shape == (1, 3, 8, 8)


def test_decode_fp32(ms, vae_cls, vae32, t2v_golden):
    out = _run(ms, vae_cls.VaeDecoderGraph(vae32), t2v_golden["vae_decode.latents"])
    assert_close_scaled(out, t2v_golden["vae_decode.sample"], name="sample")


def test_decode_slices_are_exact(ms, vae_cls, vae32, t2v_golden):
    """Frames are independent: decoding one frame at a time gives the same frames."""
    dec = vae_cls.VaeDecoderGraph(vae32)
    latents = t2v_golden["vae_decode.latents"]
    out = np.concatenate([_run(ms, dec, latents[i : i + 1]) for i in range(latents.shape[0])])
    assert_close_scaled(out, t2v_golden["vae_decode.sample"], name="sample (slices of 1)")


def test_encode_fp32(ms, vae_cls, vae32, images):
    out = _run(ms, vae_cls.VaeEncoderGraph(vae32), images)
    assert out.shape == (4, vae32.config.latent_channels, 32, 32) and np.isfinite(out).all()


def test_forward_pynative(ms, vae32, t2v_golden, images):
    """The model also runs eagerly; construct is diffusers' forward (decode of the encoded mode)."""
    graph_latent = vae32.encode(ms.Tensor(images)).asnumpy()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        latent = vae32.encode(ms.Tensor(images)).asnumpy()
        decoded = vae32.decode(ms.Tensor(t2v_golden["vae_decode.latents"])).asnumpy()
        both = vae32(ms.Tensor(images)).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    assert_close_scaled(latent, graph_latent, rel=1e-5, name="latent_mode (pynative vs graph)")
    assert_close_scaled(decoded, t2v_golden["vae_decode.sample"], name="sample (pynative)")
    assert both.shape == images.shape and np.isfinite(both).all()



def test_fp16(ms, vae_cls, vae16, t2v_golden, images):
    assert all(p.dtype == ms.float16 for p in vae16.get_parameters())
    dec = vae_cls.VaeDecoderGraph(vae16)(ms.Tensor(t2v_golden["vae_decode.latents"].astype(np.float16)))
    enc = vae_cls.VaeEncoderGraph(vae16)(ms.Tensor(images.astype(np.float16)))
    assert dec.dtype == ms.float16 and enc.dtype == ms.float16
    assert_close_scaled(dec.asnumpy(), t2v_golden["vae_decode.sample"], rel=FP16_REL, name="sample fp16")
    assert enc.shape == (4, 4, 32, 32) and np.isfinite(enc.asnumpy()).all()


def test_onnx_decoder(vae_cls, vae32, t2v_golden, tmp_path):
    net = vae_cls.VaeDecoderGraph(vae32)
    (out,), _ = onnx_roundtrip(net, [t2v_golden["vae_decode.latents"]], tmp_path / "dec.onnx")
    assert_close_scaled(out, t2v_golden["vae_decode.sample"], name="sample (onnx)")


def test_onnx_encoder(ms, vae_cls, vae32, images, tmp_path):
    net = vae_cls.VaeEncoderGraph(vae32)
    (out,), _ = onnx_roundtrip(net, [images], tmp_path / "enc.onnx")
    assert_close_scaled(out, _run(ms, net, images), name="latent_mode (onnx vs mindspore)")


def test_real_size_parameter_count(vae_cls, fixtures_dir):
    from framegraph.models.loading import count_parameters, read_config

    config = read_config(fixtures_dir / "configs/text-to-video-ms-1.7b/vae")
    assert count_parameters(vae_cls.AutoencoderKL.from_config(config)) == 83_653_863
