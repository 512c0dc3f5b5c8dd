"""diffusers' ``UNetSpatioTemporalConditionModel`` (the Stable Video Diffusion denoiser) in export-safe MindSpore.

``construct(sample, timestep, encoder_hidden_states, added_time_ids) -> noise_pred`` with
sample [B, F, C, H, W], timestep [] or [B] (float32), encoder_hidden_states [B, L, D], added_time_ids [B, 3];
the result is [B, F, out_channels, H, W]. H and W must be divisible by 2 ** (number of up-samplers).
"""

import dataclasses

import mindspore as ms
from mindspore import nn, ops

from .layers import Conv2d, GroupNorm, TimestepEmbedding, Timesteps, set_forward_chunking, silu
from .loading import config_from_dict
from .unet_config import check_block_lists, per_down_block
from .unet_spatio_temporal_blocks import DOWN_BLOCKS, UP_BLOCKS, UNetMidBlockSpatioTemporal



@dataclasses.dataclass
class UNetSpatioTemporalConditionConfig:
    """The ``config.json`` fields of ``UNetSpatioTemporalConditionModel``, with diffusers' defaults."""

    sample_size: int | None = None
    in_channels: int = 8
    out_channels: int = 4
    down_block_types: tuple = (
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "DownBlockSpatioTemporal",
    )
    up_block_types: tuple = (
        "UpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
    )
    block_out_channels: tuple = (320, 640, 1280, 1280)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768
    layers_per_block: int | tuple = 2
    cross_attention_dim: int | tuple = 1024
    transformer_layers_per_block: int | tuple = 1
    num_attention_heads: int | tuple = (5, 10, 20, 20)
    num_frames: int = 25

    def per_block(self, name):
        """An option that may be one value or one per down block, as a list with one entry per down block."""
        return per_down_block(name, getattr(self, name), self.down_block_types)

    def validate(self):
        check_block_lists(self, DOWN_BLOCKS, UP_BLOCKS)


class UNetSpatioTemporalConditionModel(nn.Cell):
    """Stable Video Diffusion's UNet. Parameter names equal the diffusers checkpoint keys.

    ``forward_chunk_size`` (or ``enable_forward_chunking``) runs every transformer feed-forward over slices of that
    many positions along the sequence axis (diffusers' ``enable_forward_chunking(chunk_size, dim=1)``): lower peak
    memory in the compiled graph, identical result.
    """

    def __init__(self, config, forward_chunk_size=None):
        super().__init__()
        config.validate()
        self.config = config
        channels = list(config.block_out_channels)
        heads = config.per_block("num_attention_heads")
        cross_dims = config.per_block("cross_attention_dim")
        layers = config.per_block("layers_per_block")
        transformer_layers = config.per_block("transformer_layers_per_block")
        temb_dim = channels[0] * 4
        n = len(channels)

        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_proj = Timesteps(channels[0], True, 0)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        self.add_time_proj = Timesteps(config.addition_time_embed_dim, True, 0)
        self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_dim)

        down = []
        for i, block_type in enumerate(config.down_block_types):
            kwargs = dict(
                in_channels=channels[max(i - 1, 0)], out_channels=channels[i], temb_channels=temb_dim,
                num_layers=layers[i], add_downsample=i < n - 1,
            )
            if DOWN_BLOCKS[block_type].has_cross_attention:
                kwargs.update(
                    transformer_layers_per_block=transformer_layers[i], num_attention_heads=heads[i],
                    cross_attention_dim=cross_dims[i],
                )
            down.append(DOWN_BLOCKS[block_type](**kwargs))
        self.down_blocks = nn.CellList(down)

        self.mid_block = UNetMidBlockSpatioTemporal(
            channels[-1], temb_dim, transformer_layers_per_block=transformer_layers[-1],
            num_attention_heads=heads[-1], cross_attention_dim=cross_dims[-1],
        )

        up = []
        rev = list(reversed(channels))
        for i, block_type in enumerate(config.up_block_types):
            j = n - 1 - i  # the down block this up block mirrors
            kwargs = dict(
                in_channels=rev[min(i + 1, n - 1)], prev_output_channel=rev[max(i - 1, 0)], out_channels=rev[i],
                temb_channels=temb_dim, num_layers=layers[j] + 1, add_upsample=i < n - 1,
            )
            if UP_BLOCKS[block_type].has_cross_attention:
                kwargs.update(
                    transformer_layers_per_block=transformer_layers[j], num_attention_heads=heads[j],
                    cross_attention_dim=cross_dims[j],
                )
            up.append(UP_BLOCKS[block_type](**kwargs))
        self.up_blocks = nn.CellList(up)
        self.num_upsamplers = n - 1

        self.conv_norm_out = GroupNorm(32, channels[0], eps=1e-5)
        self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1)
        self.forward_chunk_size = None
        self.enable_forward_chunking(forward_chunk_size)

    @classmethod
    def from_config(cls, config_dict, forward_chunk_size=None):
        return cls(config_from_dict(UNetSpatioTemporalConditionConfig, config_dict), forward_chunk_size)

    def enable_forward_chunking(self, chunk_size=None):
        """Chunk every transformer feed-forward along the sequence axis (``None`` turns chunking off); see
        :func:`~framegraph.models.layers.set_forward_chunking`."""
        set_forward_chunking(self, chunk_size)

    def construct(self, sample, timestep, encoder_hidden_states, added_time_ids):
        b, f, c, h, w = sample.shape
        factor = 2**self.num_upsamplers
        if h % factor != 0 or w % factor != 0:
            raise ValueError(
                f"sample height and width ({h}, {w}) must be multiples of {factor}, since the UNet halves them "
                f"{self.num_upsamplers} times; use an image size whose latents are multiples of {factor}"
            )

        timesteps = ops.broadcast_to(timestep.astype(ms.float32).reshape(-1), (b,))
        emb = self.time_embedding(self.time_proj(timesteps).astype(sample.dtype))
        time_embeds = self.add_time_proj(added_time_ids.reshape(-1)).reshape(b, -1).astype(emb.dtype)
        emb = emb + self.add_embedding(time_embeds)

        # one copy of the embedding and of the conditioning per frame (diffusers' repeat_interleave)
        emb = ops.broadcast_to(emb.reshape(b, 1, -1), (b, f, emb.shape[-1])).reshape(b * f, -1)
        length, dim = encoder_hidden_states.shape[1], encoder_hidden_states.shape[2]
        context = ops.broadcast_to(encoder_hidden_states.reshape(b, 1, length, dim), (b, f, length, dim))
        context = context.reshape(b * f, length, dim)

        x = self.conv_in(sample.reshape(b * f, c, h, w))
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
        return x.reshape(b, f, x.shape[1], h, w)
