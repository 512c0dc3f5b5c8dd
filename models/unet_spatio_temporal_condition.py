"""diffusers' ``UNetSpatioTemporalConditionModel`` (the Stable Video Diffusion denoiser) in export-safe MindSpore.

``construct(sample, timestep, encoder_hidden_states, added_time_ids) -> noise_pred`` with
sample [B, F, C, H, W], timestep [] or [B] (float32), encoder_hidden_states [B, L, D], added_time_ids [B, 3];
the result is [B, F, out_channels, H, W]. H and W must be divisible by 2 ** (number of up-samplers).
"""

import dataclasses

from mindspore import nn

from .layers import TimestepEmbedding, Timesteps
from .unet_common import UNetModel, down_block_channels, repeat_per_frame, up_block_channels
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


class UNetSpatioTemporalConditionModel(UNetModel):
    """Stable Video Diffusion's UNet. Parameter names equal the diffusers checkpoint keys; ``forward_chunk_size``:
    see ``UNetModel``."""

    config_class = UNetSpatioTemporalConditionConfig

    def __init__(self, config, forward_chunk_size=None):
        super().__init__(config)
        channels = list(config.block_out_channels)
        heads = config.per_block("num_attention_heads")
        cross_dims = config.per_block("cross_attention_dim")
        layers = config.per_block("layers_per_block")
        transformer_layers = config.per_block("transformer_layers_per_block")
        n = len(channels)

        temb_dim = self._build_input(config.in_channels, channels[0])
        self.add_time_proj = Timesteps(config.addition_time_embed_dim, True, 0)
        self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_dim)

        def block_options(cls, i):
            """What a block mirroring down block ``i`` takes besides its channels."""
            if not cls.has_cross_attention:
                return {}
            return dict(
                transformer_layers_per_block=transformer_layers[i], num_attention_heads=heads[i],
                cross_attention_dim=cross_dims[i],
            )

        down = []
        for i, (block_type, plan) in enumerate(zip(config.down_block_types, down_block_channels(channels))):
            cls = DOWN_BLOCKS[block_type]
            down.append(cls(temb_channels=temb_dim, num_layers=layers[i], **plan, **block_options(cls, i)))
        self.down_blocks = nn.CellList(down)

        self.mid_block = UNetMidBlockSpatioTemporal(
            channels[-1], temb_dim, transformer_layers_per_block=transformer_layers[-1],
            num_attention_heads=heads[-1], cross_attention_dim=cross_dims[-1],
        )

        up = []
        for i, (block_type, plan) in enumerate(zip(config.up_block_types, up_block_channels(channels))):
            cls = UP_BLOCKS[block_type]
            j = n - 1 - i  # the down block this up block mirrors
            up.append(cls(temb_channels=temb_dim, num_layers=layers[j] + 1, **plan, **block_options(cls, j)))
        self.up_blocks = nn.CellList(up)
        self._build_output(channels[0], config.out_channels, 32, 1e-5, forward_chunk_size)

    def construct(self, sample, timestep, encoder_hidden_states, added_time_ids):
        x, emb, context, layout = self.prepare(sample, timestep, encoder_hidden_states, added_time_ids)
        return self.finish(self._denoise(x, emb, context, layout[1]), layout)

    def prepare(self, sample, timestep, encoder_hidden_states, added_time_ids):
        """The inputs of the down path: conv_in's output [B*F, C, h, w], the per-frame embedding, the per-frame
        conditioning and the layout (B, F, h, w)."""
        b, f, c, h, w = sample.shape
        self._check_sample_size(h, w, "an image size")

        emb = self._time_embedding(timestep, b, sample.dtype)
        time_embeds = self.add_time_proj(added_time_ids.reshape(-1)).reshape(b, -1).astype(emb.dtype)
        emb = emb + self.add_embedding(time_embeds)

        # one copy of the embedding and of the conditioning per frame (diffusers' repeat_interleave)
        emb = repeat_per_frame(emb, f)
        context = repeat_per_frame(encoder_hidden_states, f)
        return self.conv_in(sample.reshape(b * f, c, h, w)), emb, context, (b, f, h, w)

    def finish(self, x, layout):
        """conv_out's output [B*F, C, h, w] -> [B, F, C, h, w]."""
        b, f, h, w = layout
        return x.reshape(b, f, x.shape[1], h, w)
