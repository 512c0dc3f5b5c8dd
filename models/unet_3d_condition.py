"""diffusers' ``UNet3DConditionModel`` (the ModelScope text-to-video denoiser) in export-safe MindSpore.

``construct(sample, timestep, encoder_hidden_states) -> noise_pred`` with sample [B, C, F, H, W], timestep [] or [B]
(float32 or an integer type; the exported graph takes float32), encoder_hidden_states [B, L, D]; the result is
[B, out_channels, F, H, W]. H and W must be divisible by 2 ** (number of up-samplers).
"""

import dataclasses

from mindspore import nn

from .unet_common import UNetModel, down_block_channels, repeat_per_frame, up_block_channels
from .unet_3d_blocks import DOWN_BLOCKS, UP_BLOCKS, TransformerTemporalModel, UNetMidBlock3DCrossAttn
from .unet_config import check_block_lists, per_down_block


# diffusers builds ``transformer_in`` with 8 heads of ``attention_head_dim`` channels, whatever the config says.
TRANSFORMER_IN_HEADS = 8


@dataclasses.dataclass
class UNet3DConditionConfig:
    """The ``config.json`` fields of ``UNet3DConditionModel``, with diffusers' defaults."""

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = (
        "CrossAttnDownBlock3D",
        "CrossAttnDownBlock3D",
        "CrossAttnDownBlock3D",
        "DownBlock3D",
    )
    up_block_types: tuple = ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1024
    attention_head_dim: int | tuple = 64
    num_attention_heads: int | tuple | None = None
    time_cond_proj_dim: int | None = None

    def block_attention_heads(self):
        """One value per down block of what diffusers passes on as ``num_attention_heads`` (its naming quirk: it is
        ``attention_head_dim`` of the config, and a block of C channels then has C // value heads of value
        channels)."""
        return per_down_block("attention_head_dim", self.attention_head_dim, self.down_block_types)

    def validate(self):
        check_block_lists(self, DOWN_BLOCKS, UP_BLOCKS)
        if self.num_attention_heads is not None:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads!r}: UNet3DConditionModel takes its head counts from "
                "attention_head_dim (diffusers refuses num_attention_heads too); set num_attention_heads to null"
            )
        if not isinstance(self.attention_head_dim, int):
            self.block_attention_heads()  # checks the length first
            raise ValueError(
                f"attention_head_dim={self.attention_head_dim!r}: a per-block list cannot build transformer_in "
                f"({TRANSFORMER_IN_HEADS} heads of attention_head_dim channels), and diffusers' UNet3DConditionModel "
                "fails on it as well; give one int"
            )
        if not isinstance(self.layers_per_block, int):
            raise ValueError(f"layers_per_block={self.layers_per_block!r} must be one int for UNet3DConditionModel")
        unsupported = {
            "act_fn": (self.act_fn, "silu"),
            "downsample_padding": (self.downsample_padding, 1),
            "time_cond_proj_dim": (self.time_cond_proj_dim, None),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(
                    f"{name}={value!r} is not supported (only {supported!r}, as published checkpoints use)"
                )
        if self.norm_num_groups is None:
            raise ValueError("norm_num_groups=None is not supported; the blocks need a GroupNorm group count")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {c} is not divisible by norm_num_groups={self.norm_num_groups}")


class UNet3DConditionModel(UNetModel):
    """ModelScope text-to-video UNet. Parameter names equal the diffusers checkpoint keys; ``forward_chunk_size``:
    see ``UNetModel``."""

    config_class = UNet3DConditionConfig

    def __init__(self, config, forward_chunk_size=None):
        super().__init__(config)
        channels = list(config.block_out_channels)
        heads = config.block_attention_heads()
        groups, eps = config.norm_num_groups, config.norm_eps
        n = len(channels)

        temb_dim = self._build_input(config.in_channels, channels[0])
        self.transformer_in = TransformerTemporalModel(
            TRANSFORMER_IN_HEADS, config.attention_head_dim, channels[0], norm_num_groups=groups
        )

        common = dict(
            temb_channels=temb_dim, resnet_eps=eps, resnet_groups=groups,
            cross_attention_dim=config.cross_attention_dim,
        )
        self.down_blocks = nn.CellList(
            [
                DOWN_BLOCKS[block_type](
                    num_layers=config.layers_per_block, num_attention_heads=heads[i], **plan, **common
                )
                for i, (block_type, plan) in enumerate(zip(config.down_block_types, down_block_channels(channels)))
            ]
        )
        self.mid_block = UNetMidBlock3DCrossAttn(
            channels[-1], temb_dim, resnet_eps=eps, resnet_groups=groups, num_attention_heads=heads[-1],
            output_scale_factor=config.mid_block_scale_factor, cross_attention_dim=config.cross_attention_dim,
        )
        self.up_blocks = nn.CellList(
            [
                UP_BLOCKS[block_type](
                    num_layers=config.layers_per_block + 1, num_attention_heads=heads[n - 1 - i], **plan, **common
                )
                for i, (block_type, plan) in enumerate(zip(config.up_block_types, up_block_channels(channels)))
            ]
        )
        self._build_output(channels[0], config.out_channels, groups, eps, forward_chunk_size)

    def construct(self, sample, timestep, encoder_hidden_states):
        x, emb, context, layout = self.prepare(sample, timestep, encoder_hidden_states)
        return self.finish(self._denoise(x, emb, context, layout[1]), layout)

    def prepare(self, sample, timestep, encoder_hidden_states):
        """The inputs of the down path: ``transformer_in``'s output [B*F, C, h, w], the per-frame embedding, the
        conditioning and the layout (B, F, h, w)."""
        b, c, f, h, w = sample.shape
        self._check_sample_size(h, w, "a video size")

        # one copy of the embedding per frame (diffusers' repeat_interleave); the text conditioning stays one per
        # video: the cross-attentions project it once and let every frame's queries attend to it
        emb = repeat_per_frame(self._time_embedding(timestep, b, sample.dtype), f)
        x = self.conv_in(sample.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
        return self.transformer_in(x, f), emb, encoder_hidden_states, (b, f, h, w)

    def finish(self, x, layout):
        """conv_out's output [B*F, C, h, w] -> [B, C, F, h, w]."""
        b, f, h, w = layout
        return x.reshape(b, f, x.shape[1], h, w).transpose(0, 2, 1, 3, 4)
