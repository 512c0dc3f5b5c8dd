"""CLIP image and text encoders against the transformers golden outputs: fp32, fp16, ONNX, real-size counts."""

import numpy as np
import pytest
from helpers import assert_close_scaled, onnx_roundtrip

FP16_REL = 5e-2


@pytest.fixture(scope="module")
def clip(ms):
    from framegraph.models import clip

    return clip


def _run(ms, net, x):
    return net(ms.Tensor(x)).asnumpy()


def _vision(clip, svd_tiny, **kwargs):
    from framegraph.models.loading import load_component

    return load_component(clip.CLIPVisionModelWithProjection, svd_tiny / "image_encoder", **kwargs)


def _text(clip, t2v_tiny, **kwargs):
    from framegraph.models.loading import load_component

    return load_component(clip.CLIPTextModel, t2v_tiny / "text_encoder", **kwargs)


def test_vision_keys_equal_checkpoint(clip, svd_tiny):
    from framegraph.models.loading import model_parameters, read_state_dict

    net = _vision(clip, svd_tiny)
    assert sorted(model_parameters(net)) == sorted(read_state_dict(svd_tiny / "image_encoder"))


def test_vision_fp32(ms, clip, svd_tiny, svd_golden):
    out = _run(ms, _vision(clip, svd_tiny), svd_golden["image_encoder.pixel_values"])
    assert_close_scaled(out, svd_golden["image_encoder.image_embeds"], name="image_embeds")


def test_vision_pynative(ms, clip, svd_tiny, svd_golden):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        out = _run(ms, _vision(clip, svd_tiny), svd_golden["image_encoder.pixel_values"])
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    assert_close_scaled(out, svd_golden["image_encoder.image_embeds"], name="image_embeds (pynative)")


def test_vision_fp16(ms, clip, svd_tiny, svd_golden):
    net = _vision(clip, svd_tiny, variant="fp16", dtype="float16")
    out = net(ms.Tensor(svd_golden["image_encoder.pixel_values"].astype(np.float16)))
    assert out.dtype == ms.float16
    assert_close_scaled(out.asnumpy(), svd_golden["image_encoder.image_embeds"], rel=FP16_REL, name="image_embeds fp16")


def test_vision_onnx(clip, svd_tiny, svd_golden, tmp_path):
    x = svd_golden["image_encoder.pixel_values"]
    (out,), _ = onnx_roundtrip(_vision(clip, svd_tiny), [x], tmp_path / "image_encoder.onnx")
    assert_close_scaled(out, svd_golden["image_encoder.image_embeds"], name="image_embeds (onnx)")


def test_text_keys_equal_checkpoint(clip, t2v_tiny):
    from framegraph.models.loading import model_parameters, read_state_dict

    net = _text(clip, t2v_tiny)
    assert sorted(model_parameters(net)) == sorted(read_state_dict(t2v_tiny / "text_encoder"))


def test_text_fp32(ms, clip, t2v_tiny, t2v_golden):
    out = _run(ms, _text(clip, t2v_tiny), t2v_golden["text_encoder.input_ids"])
    assert_close_scaled(out, t2v_golden["text_encoder.last_hidden_state"], name="last_hidden_state")


def test_text_pynative(ms, clip, t2v_tiny, t2v_golden):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        out = _run(ms, _text(clip, t2v_tiny), t2v_golden["text_encoder.input_ids"])
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    assert_close_scaled(out, t2v_golden["text_encoder.last_hidden_state"], name="last_hidden_state (pynative)")


def test_text_fp16(ms, clip, t2v_tiny, t2v_golden):
    net = _text(clip, t2v_tiny, variant="fp16", dtype="float16")
    out = net(ms.Tensor(t2v_golden["text_encoder.input_ids"]))
    assert out.dtype == ms.float16
    ref = t2v_golden["text_encoder.last_hidden_state"]
    assert_close_scaled(out.asnumpy(), ref, rel=FP16_REL, name="last_hidden_state fp16")


def test_text_onnx_int64_ids(clip, t2v_tiny, t2v_golden, tmp_path):
    ids = t2v_golden["text_encoder.input_ids"]
    assert ids.dtype == np.int64
    (out,), _ = onnx_roundtrip(_text(clip, t2v_tiny), [ids], tmp_path / "text_encoder.onnx")
    assert_close_scaled(out, t2v_golden["text_encoder.last_hidden_state"], name="last_hidden_state (onnx)")


def test_text_causal(ms, clip, t2v_tiny, t2v_golden):
    """Changing a later token leaves every earlier position's output unchanged."""
    net = _text(clip, t2v_tiny)
    ids = t2v_golden["text_encoder.input_ids"][:1].copy()
    base = _run(ms, net, ids)
    ids[0, 40] = 5
    changed = _run(ms, net, ids)
    np.testing.assert_array_equal(changed[0, :40], base[0, :40])
    assert np.abs(changed[0, 40:] - base[0, 40:]).max() > 0


def test_text_legacy_checkpoint_keys(clip, t2v_tiny):
    """transformers-4 files: ``text_model.`` prefix and the ``position_ids`` buffer, mapped onto the model's keys."""
    from framegraph.models.loading import check_state_dict, model_parameters, read_state_dict

    state = read_state_dict(t2v_tiny / "text_encoder")
    legacy = {"text_model." + k: v for k, v in state.items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    converted = clip.CLIPTextModel.convert_state_dict(legacy)
    assert sorted(converted) == sorted(state)
    net = _text(clip, t2v_tiny)
    check_state_dict(model_parameters(net), converted)

    legacy["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None, ::-1]
    with pytest.raises(ValueError, match="position_ids"):
        clip.CLIPTextModel.convert_state_dict(legacy)


def test_vision_legacy_position_ids(clip, svd_tiny):
    from framegraph.models.loading import read_state_dict

    state = read_state_dict(svd_tiny / "image_encoder")
    legacy = dict(state, **{"vision_model.embeddings.position_ids": np.arange(50, dtype=np.int64)[None]})
    assert sorted(clip.CLIPVisionModelWithProjection.convert_state_dict(legacy)) == sorted(state)


@pytest.mark.parametrize("model, folder, expected", [
    ("CLIPVisionModelWithProjection", "svd-xt/image_encoder", 632_076_800),
    ("CLIPTextModel", "text-to-video-ms-1.7b/text_encoder", 340_387_840),
])
def test_real_size_parameter_count(clip, fixtures_dir, model, folder, expected):
    from framegraph.models.loading import build_uninitialised, count_parameters, read_config

    net = build_uninitialised(getattr(clip, model), read_config(fixtures_dir / "configs" / folder))
    assert count_parameters(net) == expected


def test_config_defaults_and_real_activation(clip, fixtures_dir):
    from mindspore.nn.utils import no_init_parameters
    from framegraph.models.loading import read_config

    with no_init_parameters():
        config = read_config(fixtures_dir / "configs/svd-xt/image_encoder")
        vision = clip.CLIPVisionModelWithProjection.from_config(config)
    assert (vision.config.hidden_act, vision.config.patch_size, vision.config.projection_dim) == ("gelu", 14, 1024)
    assert clip.CLIPTextConfig().max_position_embeddings == 77
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPTextModel(clip.CLIPTextConfig(hidden_act="relu"))


def test_gelu_variant_onnx(ms, clip, svd_golden, tmp_path):
    """The real checkpoints use hidden_act="gelu" (the tiny fixtures quick_gelu): that path exports too."""
    config = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
              "patch_size": 32, "projection_dim": 16, "hidden_act": "gelu"}
    net = clip.CLIPVisionModelWithProjection.from_config(config)
    x = svd_golden["image_encoder.pixel_values"]
    ref = _run(ms, net, x)
    (out,), _ = onnx_roundtrip(net, [x], tmp_path / "image_encoder_gelu.onnx")
    assert_close_scaled(out, ref, name="image_embeds gelu (onnx vs mindspore)")
