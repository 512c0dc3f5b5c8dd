"""The block-list checks both UNet configs share (models/unet_config.py)."""

import pytest

from framegraph.models.unet_3d_condition import UNet3DConditionConfig
from framegraph.models.unet_spatio_temporal_condition import UNetSpatioTemporalConditionConfig

CONFIGS = [UNetSpatioTemporalConditionConfig, UNet3DConditionConfig]


@pytest.mark.parametrize("cls", CONFIGS)
def test_defaults_are_valid(cls):
    cls().validate()


@pytest.mark.parametrize("cls", CONFIGS)
def test_up_blocks_must_match_down_blocks(cls):
    config = cls()
    config.up_block_types = config.up_block_types[:3]
    with pytest.raises(ValueError, match="4 down_block_types but 3 up_block_types"):
        config.validate()


@pytest.mark.parametrize("cls", CONFIGS)
def test_one_block_out_channels_per_block(cls):
    config = cls(block_out_channels=(320, 640, 1280))
    with pytest.raises(ValueError, match="3 block_out_channels for 4 down blocks"):
        config.validate()


@pytest.mark.parametrize("cls", CONFIGS)
def test_unknown_block_types_are_named(cls):
    config = cls()
    config.down_block_types = ("AttnDownBlock2D",) + tuple(config.down_block_types[1:])
    with pytest.raises(ValueError, match=r"unsupported down block types \['AttnDownBlock2D'\]; supported: "):
        config.validate()
    config = cls()
    config.up_block_types = tuple(config.up_block_types[:3]) + ("UpBlock2D",)
    with pytest.raises(ValueError, match=r"unsupported up block types \['UpBlock2D'\]"):
        config.validate()


def test_per_block_values():
    svd = UNetSpatioTemporalConditionConfig(layers_per_block=2, num_attention_heads=(5, 10, 20, 20))
    assert svd.per_block("layers_per_block") == [2, 2, 2, 2]
    assert svd.per_block("num_attention_heads") == [5, 10, 20, 20]
    with pytest.raises(ValueError, match=r"num_attention_heads=\(5, 10\) needs one entry per down block \(4: "):
        UNetSpatioTemporalConditionConfig(num_attention_heads=(5, 10)).per_block("num_attention_heads")
    assert UNet3DConditionConfig(attention_head_dim=64).block_attention_heads() == [64] * 4
    with pytest.raises(ValueError, match=r"attention_head_dim=\(8, 8\) needs one entry per down block"):
        UNet3DConditionConfig(attention_head_dim=(8, 8)).block_attention_heads()
