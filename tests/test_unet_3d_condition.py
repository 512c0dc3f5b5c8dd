"""UNet3DConditionModel (text-to-video) against diffusers' golden output (t2v-tiny), in fp32 (PyNative) and fp16
(graph mode). Its exported graphs are compared with the same golden in test_pipeline_t2v.py."""

import numpy as np
import pytest
from helpers import assert_close_scaled, pynative

TEXT_TO_VIDEO_MS_UNET_PARAMETERS = 1_411_233_860


def _unet_cls():
    from framegraph.models.unet_3d_condition import UNet3DConditionModel

    return UNet3DConditionModel


def _load(t2v_tiny, **kwargs):
    from framegraph.models.loading import load_component

    return load_component(_unet_cls(), t2v_tiny / "unet", **kwargs)


def _read_config(folder):
    from framegraph.models.loading import read_config

    return read_config(folder)


@pytest.fixture(scope="module")
def unet_fp32(ms, t2v_tiny):
    return _load(t2v_tiny)


def _inputs(golden, dtype=np.float32, timestep_dtype=np.float32):
    """sample [B, C, F, H, W], timestep (a scalar), encoder_hidden_states [B, 77, D]."""
    return [
        golden["unet.sample"].astype(dtype),
        np.asarray(golden["unet.timestep"]).astype(timestep_dtype),
        golden["unet.encoder_hidden_states"].astype(dtype),
    ]


def _run(ms, net, inputs):
    return net(*[ms.Tensor(x) for x in inputs]).asnumpy()


def test_parity_fp32_integer_timestep(ms, unet_fp32, t2v_golden):
    """The golden timestep is an int64 scalar, as the pipeline passes it."""
    with pynative(ms):
        out = _run(ms, unet_fp32, _inputs(t2v_golden, timestep_dtype=np.int64))
    assert_close_scaled(out, t2v_golden["unet.out"], rel=1e-4, name="unet fp32")


def test_parity_fp16(ms, t2v_tiny, t2v_golden):
    net = _load(t2v_tiny, variant="fp16", dtype="float16")
    out = _run(ms, net, _inputs(t2v_golden, np.float16))
    assert out.dtype == np.float16
    assert_close_scaled(out, t2v_golden["unet.out"], rel=5e-2, name="unet fp16")


def test_pynative_with_per_sample_timestep(ms, t2v_tiny, t2v_golden):
    """PyNative mode, with a float32 [B] timestep: the same result as the scalar one (diffusers broadcasts it)."""
    inputs = _inputs(t2v_golden)
    inputs[1] = np.full((inputs[0].shape[0],), inputs[1], np.float32)
    with pynative(ms):
        out = _run(ms, _load(t2v_tiny), inputs)
    assert_close_scaled(out, t2v_golden["unet.out"], rel=1e-4, name="unet pynative, [B] timestep")


def test_forward_chunking_is_exact(ms, t2v_tiny):
    """Chunked feed-forwards (a last chunk shorter than the others) give the unchunked result, in a spatial and a
    temporal transformer, up to float rounding of the differently sized matmuls. Graph mode:
    test_export_isolated.py exports a chunked UNet."""
    from mindspore import nn

    class Pair(nn.Cell):
        def __init__(self, spatial, temporal):
            super().__init__()
            self.spatial = spatial
            self.temporal = temporal

        def construct(self, x, context):
            return self.temporal(self.spatial(x, context), 3)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)  # [B * F, C, H, W], F = 3
    context = rng.standard_normal((6, 77, 4)).astype(np.float32)
    outs = []
    for chunk in (None, 2):
        net = _load(t2v_tiny)
        net.enable_forward_chunking(chunk)
        block = net.down_blocks[0]
        assert block.temp_attentions[0].transformer_blocks[0].chunk_size == chunk
        assert block.attentions[0].transformer_blocks[0].chunk_size == chunk
        pair = Pair(block.attentions[0], block.temp_attentions[0])
        with pynative(ms):
            outs.append(pair(ms.Tensor(x), ms.Tensor(context)).asnumpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)


def test_parameter_names_equal_checkpoint_keys(t2v_tiny):
    pytest.importorskip("mindspore")
    from safetensors.numpy import load_file

    from framegraph.models.loading import model_parameters

    net = _unet_cls().from_config(_read_config(t2v_tiny / "unet"))
    state = load_file(str(t2v_tiny / "unet" / "diffusion_pytorch_model.safetensors"))
    params = model_parameters(net)
    assert sorted(params) == sorted(state)
    assert all(tuple(params[k].shape) == state[k].shape for k in state)


def test_text_to_video_ms_parameter_count(fixtures_dir):
    pytest.importorskip("mindspore")
    from framegraph.models.loading import build_uninitialised, count_parameters

    config = _read_config(fixtures_dir / "configs" / "text-to-video-ms-1.7b" / "unet")
    net = build_uninitialised(_unet_cls(), config)
    assert count_parameters(net) == TEXT_TO_VIDEO_MS_UNET_PARAMETERS


def test_config_errors(t2v_tiny):
    pytest.importorskip("mindspore")
    from framegraph.models.unet_3d_condition import UNet3DConditionConfig

    assert UNet3DConditionConfig(attention_head_dim=[8, 8, 16, 16]).block_attention_heads() == [8, 8, 16, 16]
    with pytest.raises(ValueError, match="one entry per down block"):
        UNet3DConditionConfig(attention_head_dim=[8, 16]).validate()
    with pytest.raises(ValueError, match="transformer_in"):
        UNet3DConditionConfig(attention_head_dim=[8, 8, 16, 16]).validate()
    with pytest.raises(ValueError, match="num_attention_heads"):
        UNet3DConditionConfig(num_attention_heads=8).validate()
    with pytest.raises(ValueError, match="unsupported down block types"):
        UNet3DConditionConfig(down_block_types=("DownBlock2D",) * 4).validate()
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        UNet3DConditionConfig(time_cond_proj_dim=256).validate()
    with pytest.raises(ValueError, match="forward_chunk_size"):
        _unet_cls().from_config(_read_config(t2v_tiny / "unet"), forward_chunk_size=0)
