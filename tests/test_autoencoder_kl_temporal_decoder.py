"""AutoencoderKLTemporalDecoder (the SVD VAE) against diffusers' golden outputs: fp32, fp16, ONNX, parameter count."""

import numpy as np
import pytest

from helpers import assert_close_scaled, onnx_roundtrip

FP16_REL = 5e-2


@pytest.fixture(scope="module")
def vae_cls(ms):
    from framegraph.models import autoencoder_kl_temporal_decoder as module

    return module


@pytest.fixture(scope="module")
def vae32(vae_cls, svd_tiny):
    from framegraph.models.loading import load_component

    return load_component(vae_cls.AutoencoderKLTemporalDecoder, svd_tiny / "vae")


@pytest.fixture(scope="module")
def vae16(vae_cls, svd_tiny):
    from framegraph.models.loading import load_component

    return load_component(vae_cls.AutoencoderKLTemporalDecoder, svd_tiny / "vae", variant="fp16", dtype="float16")


def _run(ms, net, x, dtype=np.float32):
    return net(ms.Tensor(np.asarray(x, dtype=dtype))).asnumpy().astype(np.float32)


def test_parameter_names_are_checkpoint_keys(vae32, svd_tiny):
    from framegraph.models.loading import model_parameters, read_state_dict

    assert set(model_parameters(vae32)) == set(read_state_dict(svd_tiny / "vae"))


def test_config_and_scale_factor(vae_cls, vae32, fixtures_dir):
    from framegraph.models.loading import config_from_dict, read_config

    assert vae32.config.vae_scale_factor == 2
    assert vae32.config.block_out_channels == (32, 64)
    xt = config_from_dict(vae_cls.AutoencoderKLTemporalDecoderConfig, read_config(fixtures_dir / "configs/svd-xt/vae"))
    assert xt.vae_scale_factor == 8 and xt.layers_per_block == 2


def test_encode_fp32(ms, vae_cls, vae32, svd_golden):
    out = _run(ms, vae_cls.VaeEncoderGraph(vae32), svd_golden["vae_encode.sample"])
    assert_close_scaled(out, svd_golden["vae_encode.latent_mode"], name="latent_mode")


def test_decode_fp32(ms, vae_cls, vae32, svd_golden):
    out = _run(ms, vae_cls.VaeDecoderGraph(vae32, 2), svd_golden["vae_decode.latents"])
    assert_close_scaled(out, svd_golden["vae_decode.sample"], name="sample")


def test_decode_one_frame_chunks(ms, vae_cls, vae32, svd_golden):
    """num_frames=1: each latent is its own clip, so reversing the latents reverses the frames."""
    latents = svd_golden["vae_decode.latents"]
    dec = vae_cls.VaeDecoderGraph(vae32, 1)
    out = _run(ms, dec, latents)
    assert out.shape == svd_golden["vae_decode.sample"].shape and np.isfinite(out).all()
    reversed_out = _run(ms, dec, np.ascontiguousarray(latents[::-1]))
    assert_close_scaled(reversed_out[::-1], out, rel=1e-5, name="chunk1")
    # the temporal layers mix the two frames when they form one clip, so the results must differ
    assert np.abs(out - svd_golden["vae_decode.sample"]).max() > 1e-3


def test_forward_pynative(ms, vae32, svd_golden):
    """The model also runs eagerly; construct is diffusers' forward (decode of the encoded mode)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        sample = ms.Tensor(svd_golden["vae_encode.sample"])
        latent = vae32.encode(sample).asnumpy()
        decoded = vae32.decode(ms.Tensor(svd_golden["vae_decode.latents"]), 2).asnumpy()
        both = vae32(sample, 1).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    assert_close_scaled(latent, svd_golden["vae_encode.latent_mode"], name="latent_mode (pynative)")
    assert_close_scaled(decoded, svd_golden["vae_decode.sample"], name="sample (pynative)")
    assert both.shape == svd_golden["vae_encode.sample"].shape and np.isfinite(both).all()


def test_fp16(ms, vae_cls, vae16, svd_golden):
    assert all(p.dtype == ms.float16 for p in vae16.get_parameters())
    enc = vae_cls.VaeEncoderGraph(vae16)(ms.Tensor(svd_golden["vae_encode.sample"].astype(np.float16)))
    dec = vae_cls.VaeDecoderGraph(vae16, 2)(ms.Tensor(svd_golden["vae_decode.latents"].astype(np.float16)))
    assert enc.dtype == ms.float16 and dec.dtype == ms.float16
    assert_close_scaled(enc.asnumpy(), svd_golden["vae_encode.latent_mode"], rel=FP16_REL, name="latent_mode fp16")
    assert_close_scaled(dec.asnumpy(), svd_golden["vae_decode.sample"], rel=FP16_REL, name="sample fp16")


def test_onnx_encoder(vae_cls, vae32, svd_golden, tmp_path):
    (out,), _ = onnx_roundtrip(vae_cls.VaeEncoderGraph(vae32), [svd_golden["vae_encode.sample"]], tmp_path / "enc.onnx")
    assert_close_scaled(out, svd_golden["vae_encode.latent_mode"], name="latent_mode (onnx)")


def test_onnx_decoder(vae_cls, vae32, svd_golden, tmp_path):
    net = vae_cls.VaeDecoderGraph(vae32, 2)
    (out,), _ = onnx_roundtrip(net, [svd_golden["vae_decode.latents"]], tmp_path / "dec.onnx")
    assert_close_scaled(out, svd_golden["vae_decode.sample"], name="sample (onnx)")


def test_real_size_parameter_count(vae_cls, fixtures_dir):
    from framegraph.models.loading import count_parameters, read_config

    config = read_config(fixtures_dir / "configs/svd-xt/vae")
    assert count_parameters(vae_cls.AutoencoderKLTemporalDecoder.from_config(config)) == 97_742_847


def test_vae_blocks_decoder_matches_image_vae(ms, t2v_tiny, t2v_golden):
    """The shared 2-D ``Decoder`` (and ``Encoder`` keys, norm_num_groups=2) against the text-to-video image VAE."""
    from mindspore import nn

    from framegraph.models.layers import Conv2d
    from framegraph.models.loading import load_state_dict_into, read_config, read_state_dict
    from framegraph.models.vae_blocks import Decoder, Encoder

    cfg = read_config(t2v_tiny / "vae")
    common = dict(
        block_out_channels=cfg["block_out_channels"],
        layers_per_block=cfg["layers_per_block"],
        norm_num_groups=cfg["norm_num_groups"],
        act_fn=cfg["act_fn"],
        mid_block_add_attention=cfg["mid_block_add_attention"],
    )
    latent = cfg["latent_channels"]

    class ImageVaeDecode(nn.Cell):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder(cfg["in_channels"], latent, cfg["down_block_types"], **common)
            self.decoder = Decoder(latent, cfg["out_channels"], cfg["up_block_types"], **common)
            self.quant_conv = Conv2d(2 * latent, 2 * latent, 1)
            self.post_quant_conv = Conv2d(latent, latent, 1)

        def construct(self, z):
            return self.decoder(self.post_quant_conv(z))

    net = load_state_dict_into(ImageVaeDecode(), read_state_dict(t2v_tiny / "vae"))
    out = _run(ms, net, t2v_golden["vae_decode.latents"])
    assert_close_scaled(out, t2v_golden["vae_decode.sample"], name="image vae sample")
