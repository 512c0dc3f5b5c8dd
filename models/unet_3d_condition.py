"""diffusers' ``UNet3DConditionModel`` (the ModelScope text-to-video denoiser) in export-safe MindSpore.

``construct(sample, timestep, encoder_hidden_states) -> noise_pred`` with sample [B, C, F, H, W], timestep [] or [B]
(float32 or an integer type; the exported graph takes float32), encoder_hidden_states [B, L, D]; the result is
[B, out_channels, F, H, W]. H and W must be divisible by 2 ** (number of up-samplers).
"""

import dataclasses

import mindspore as ms
from mindspore import nn, ops

from .layers import Conv2d, GroupNorm, TimestepEmbedding, Timesteps, set_forward_chunking, silu
from .loading import config_from_dict
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


class UNet3DConditionModel(nn.Cell):
    """ModelScope text-to-video UNet. Parameter names equal the diffusers checkpoint keys.

    ``forward_chunk_size`` (or ``enable_forward_chunking``) runs every transformer feed-forward over slices of that
    many positions along axis 1 (diffusers' ``enable_forward_chunking(chunk_size, dim=1)``): spatial positions in
    the spatial transformers, frames in the temporal ones. Lower peak memory, identical result.
    """

    def __init__(self, config, forward_chunk_size=None):
        super().__init__()
        config.validate()
        self.config = config
        channels = list(config.block_out_channels)
        heads = config.block_attention_heads()
        groups, eps = config.norm_num_groups, config.norm_eps
        temb_dim = channels[0] * 4
        n = len(channels)

        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_proj = Timesteps(channels[0], True, 0)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
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
                    in_channels=channels[max(i - 1, 0)], out_channels=channels[i], num_layers=config.layers_per_block,
                    num_attention_heads=heads[i], add_downsample=i < n - 1, **common,
                )
                for i, block_type in enumerate(config.down_block_types)
            ]
        )
        self.mid_block = UNetMidBlock3DCrossAttn(
            channels[-1], temb_dim, resnet_eps=eps, resnet_groups=groups, num_attention_heads=heads[-1],
            output_scale_factor=config.mid_block_scale_factor, cross_attention_dim=config.cross_attention_dim,
        )
        rev = list(reversed(channels))
        rev_heads = list(reversed(heads))
        self.up_blocks = nn.CellList(
            [
                UP_BLOCKS[block_type](
                    in_channels=rev[min(i + 1, n - 1)], prev_output_channel=rev[max(i - 1, 0)], out_channels=rev[i],
                    num_layers=config.layers_per_block + 1, num_attention_heads=rev_heads[i],
                    add_upsample=i < n - 1, **common,
                )
                for i, block_type in enumerate(config.up_block_types)
            ]
        )
        self.num_upsamplers = n - 1

        self.conv_norm_out = GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1)
        self.forward_chunk_size = None
        self.enable_forward_chunking(forward_chunk_size)

    @classmethod
    def from_config(cls, config_dict, forward_chunk_size=None):
        return cls(config_from_dict(UNet3DConditionConfig, config_dict), forward_chunk_size)

    def enable_forward_chunking(self, chunk_size=None):
        """Chunk every transformer feed-forward along axis 1 (``None`` turns chunking off); see
        :func:`~framegraph.models.layers.set_forward_chunking`."""
        set_forward_chunking(self, chunk_size)

    def construct(self, sample, timestep, encoder_hidden_states):
        b, c, f, h, w = sample.shape
        factor = 2**self.num_upsamplers
        if h % factor != 0 or w % factor != 0:
            raise ValueError(
                f"sample height and width ({h}, {w}) must be multiples of {factor}, since the UNet halves them "
                f"{self.num_upsamplers} times; use a video size whose latents are multiples of {factor}"
            )

        timesteps = ops.broadcast_to(timestep.astype(ms.float32).reshape(-1), (b,))
        emb = self.time_embedding(self.time_proj(timesteps).astype(sample.dtype))

        # one copy of the embedding per frame (diffusers' repeat_interleave); the text conditioning stays one per
        # video: the cross-attentions project it once and let every frame's queries attend to it
        emb = ops.broadcast_to(emb.reshape(b, 1, -1), (b, f, emb.shape[-1])).reshape(b * f, -1)
        context = encoder_hidden_states

        x = self.conv_in(sample.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
        x = self.transformer_in(x, f)
        skips = (x,)
        for block in self.down_blocks:
            x, states = block(x, emb, context, f)
            skips = skips + states

        x = self.mid_block(x, emb, context, f)

        for block in self.up_blocks:
            count = block.num_layers
            x = block(x, skips[len(skips) - count :], emb, context, f)
            skips = skips[: len(skips) - count]

        x = self.conv_out(silu(self.conv_norm_out(x)))
        return x.reshape(b, f, x.shape[1], h, w).transpose(0, 2, 1, 3, 4)
