"""UNetSpatioTemporalConditionModel against diffusers' golden output (svd-tiny), in fp32 (PyNative) and fp16 (graph
mode). Its exported graphs are compared with the same golden in test_export.py."""

import numpy as np
import pytest
from helpers import assert_close_scaled, pynative

SVD_XT_UNET_PARAMETERS = 1_524_623_082


def _unet_cls():
    from framegraph.models.unet_spatio_temporal_condition import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel


def _load(svd_tiny, **kwargs):
    from framegraph.models.loading import load_component

    return load_component(_unet_cls(), svd_tiny / "unet", **kwargs)


def _inputs(golden, dtype=np.float32):
    """sample, timestep (float32 scalar, as the pipeline passes it), encoder_hidden_states, added_time_ids."""
    return [
        golden["unet.sample"].astype(dtype),
        golden["unet.timestep"].astype(np.float32),
        golden["unet.encoder_hidden_states"].astype(dtype),
        golden["unet.added_time_ids"].astype(dtype),
    ]


def _run(ms, net, inputs):
    return net(*[ms.Tensor(x) for x in inputs]).asnumpy()


def test_parity_fp32(ms, svd_tiny, svd_golden):
    with pynative(ms):
        out = _run(ms, _load(svd_tiny), _inputs(svd_golden))
    assert_close_scaled(out, svd_golden["unet.out"], rel=1e-4, name="unet fp32")


def test_parity_fp16(ms, svd_tiny, svd_golden):
    out = _run(ms, _load(svd_tiny, variant="fp16", dtype="float16"), _inputs(svd_golden, np.float16))
    assert out.dtype == np.float16
    assert_close_scaled(out, svd_golden["unet.out"], rel=5e-2, name="unet fp16")


def test_pynative_with_per_sample_timestep(ms, svd_tiny, svd_golden):
    """PyNative mode, with a [B] timestep: the same result as the scalar one (diffusers broadcasts it)."""
    inputs = _inputs(svd_golden)
    batch = inputs[0].shape[0]
    inputs[1] = np.full((batch,), inputs[1], np.float32)
    with pynative(ms):
        out = _run(ms, _load(svd_tiny), inputs)
    assert_close_scaled(out, svd_golden["unet.out"], rel=1e-4, name="unet pynative, [B] timestep")


def test_forward_chunking_is_exact(ms, svd_tiny):
    """Chunked feed-forwards (a last chunk shorter than the others) give the unchunked result, up to float rounding
    of the differently sized matmuls. Graph mode: test_export_isolated.py exports a chunked UNet."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 32, 8, 8)).astype(np.float32)  # [B * F, C, H, W], F = 2
    context = rng.standard_normal((4, 1, 32)).astype(np.float32)
    outs = []
    for chunk in (None, 5):
        net = _load(svd_tiny)
        net.enable_forward_chunking(chunk)
        block = net.down_blocks[0].attentions[0]
        assert block.temporal_transformer_blocks[0].chunk_size == chunk
        with pynative(ms):
            outs.append(block(ms.Tensor(x), ms.Tensor(context), 2).asnumpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)


def test_parameter_names_equal_checkpoint_keys(svd_tiny):
    pytest.importorskip("mindspore")
    from safetensors.numpy import load_file

    from framegraph.models.loading import model_parameters

    net = _unet_cls().from_config(_read_config(svd_tiny / "unet"))
    state = load_file(str(svd_tiny / "unet" / "diffusion_pytorch_model.safetensors"))
    params = model_parameters(net)
    assert sorted(params) == sorted(state)
    assert all(tuple(params[k].shape) == state[k].shape for k in state)


def test_svd_xt_parameter_count(fixtures_dir):
    pytest.importorskip("mindspore")
    from framegraph.models.loading import build_uninitialised, count_parameters

    net = build_uninitialised(_unet_cls(), _read_config(fixtures_dir / "configs" / "svd-xt" / "unet"))
    assert count_parameters(net) == SVD_XT_UNET_PARAMETERS


def test_config_errors():
    pytest.importorskip("mindspore")
    from framegraph.models.unet_spatio_temporal_condition import UNetSpatioTemporalConditionConfig

    with pytest.raises(ValueError, match="num_attention_heads"):
        UNetSpatioTemporalConditionConfig(num_attention_heads=[5, 10]).per_block("num_attention_heads")
    with pytest.raises(ValueError, match="unsupported down block types"):
        UNetSpatioTemporalConditionConfig(down_block_types=("DownBlock2D",) * 4).validate()


def _read_config(folder):
    from framegraph.models.loading import read_config

    return read_config(folder)


def test_temporal_block_with_a_longer_context_equals_the_single_token_path(ms):
    """A context of identical tokens gives each query uniform weights over equal values: the one token's value.
    So the shared-context path (contexts longer than one token) must equal the single-key path."""
    from framegraph.models.unet_spatio_temporal_blocks import TemporalBasicTransformerBlock

    rng = np.random.default_rng(0)
    block = TemporalBasicTransformerBlock(16, heads=2, dim_head=8, cross_attention_dim=12)
    frames = 3
    x = ms.Tensor(rng.standard_normal((2 * frames, 5, 16)).astype(np.float32))
    token = rng.standard_normal((2, 1, 12)).astype(np.float32)
    one = block(x, frames, ms.Tensor(token)).asnumpy()
    four = block(x, frames, ms.Tensor(np.repeat(token, 4, axis=1))).asnumpy()
    np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-5)
    other = block(x, frames, ms.Tensor(rng.standard_normal((2, 4, 12)).astype(np.float32))).asnumpy()
    assert np.abs(other - one).max() > 1e-3
