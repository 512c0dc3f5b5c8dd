"""diffusers' ``AutoencoderKLTemporalDecoder``: the Stable Video Diffusion VAE.

The encoder is the 2-D VAE ``Encoder`` (``vae_blocks.py``), applied per frame. The decoder interleaves per-frame 2-D
resnets with temporal resnets (kernel (3, 1, 1) convolutions over the frames of each clip) blended by a learned
factor, and ends in a temporal convolution ``time_conv_out``. Frames arrive flattened as [B*F, C, H, W]; ``num_frames``
(F) is a Python int, so every shape is static when the graph is compiled.
"""

import dataclasses
import logging

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from .layers import Conv2d, GroupNorm, TemporalConv3d, silu
from .loading import config_from_dict
from .vae_blocks import (  # noqa: F401 -- VaeEncoderGraph: part of this module's API (the exporter, the tests)
    AttentionBlock,
    Encoder,
    ResnetBlock2D,
    Upsample2D,
    VaeEncoderGraph,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AutoencoderKLTemporalDecoderConfig:
    """The ``config.json`` of an ``AutoencoderKLTemporalDecoder`` (diffusers' defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    sample_size: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    def __post_init__(self):
        self.down_block_types = tuple(self.down_block_types)
        self.block_out_channels = tuple(self.block_out_channels)
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError(
                f"down_block_types {self.down_block_types} and block_out_channels {self.block_out_channels} "
                "must have the same length"
            )

    @property
    def vae_scale_factor(self):
        """Pixels per latent along each side: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)


def _to_clips(x, num_frames):
    """[B*F, C, H, W] -> [B, C, F, H, W]."""
    bf, c, h, w = x.shape
    return x.reshape(bf // num_frames, num_frames, c, h, w).transpose(0, 2, 1, 3, 4)


def _to_frames(x):
    """[B, C, F, H, W] -> [B*F, C, H, W]."""
    b, c, f, h, w = x.shape
    return x.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


class TemporalResnetBlock(nn.Cell):
    """diffusers' ``TemporalResnetBlock`` without a time embedding, on [B, C, F, H, W] (same channels in and out)."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.norm1 = GroupNorm(32, channels, eps=eps)
        self.conv1 = TemporalConv3d(channels, channels)
        self.norm2 = GroupNorm(32, channels, eps=eps)
        self.conv2 = TemporalConv3d(channels, channels)

    def construct(self, x):
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        return x + h


class AlphaBlender(nn.Cell):
    """diffusers' ``AlphaBlender(merge_strategy="learned", switch_spatial_to_temporal_mix=True)``.

    alpha = sigmoid(mix_factor); the switch makes the result alpha * temporal + (1 - alpha) * spatial.
    """

    def __init__(self, alpha=0.0):
        super().__init__()
        self.mix_factor = Parameter(initializer(alpha, (1,), ms.float32), name="mix_factor")

    def construct(self, x_spatial, x_temporal):
        alpha = ops.sigmoid(self.mix_factor).astype(x_spatial.dtype)
        return alpha * x_temporal + (1.0 - alpha) * x_spatial


class SpatioTemporalResBlock(nn.Cell):
    """A per-frame ``ResnetBlock2D``, then a ``TemporalResnetBlock`` over each clip, blended by ``time_mixer``."""

    def __init__(self, in_channels, out_channels, eps=1e-6, temporal_eps=1e-5):
        super().__init__()
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, eps=eps)
        self.temporal_res_block = TemporalResnetBlock(out_channels, eps=temporal_eps)
        self.time_mixer = AlphaBlender(0.0)

    def construct(self, x, num_frames):
        spatial = _to_clips(self.spatial_res_block(x), num_frames)
        mixed = self.time_mixer(spatial, self.temporal_res_block(spatial))
        return _to_frames(mixed)


class MidBlockTemporalDecoder(nn.Cell):
    """resnets[0], then (attentions[0], resnets[1]) when there are two or more resnets.

    diffusers pairs ``resnets[1:]`` with its single attention, so resnets beyond the second exist in the checkpoint
    but are never applied; this block does the same.
    """

    def __init__(self, in_channels, out_channels, attention_head_dim=512, num_layers=1):
        super().__init__()
        self.resnets = nn.CellList(
            [SpatioTemporalResBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)]
        )
        self.attentions = nn.CellList([AttentionBlock(in_channels, in_channels // attention_head_dim, 32, 1e-6)])
        self.use_attention = num_layers > 1

    def construct(self, x, num_frames):
        x = self.resnets[0](x, num_frames)
        if self.use_attention:
            x = self.resnets[1](self.attentions[0](x), num_frames)
        return x


class UpBlockTemporalDecoder(nn.Cell):
    def __init__(self, in_channels, out_channels, num_layers=1, add_upsample=True):
        super().__init__()
        self.resnets = nn.CellList(
            [SpatioTemporalResBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)]
        )
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None

    def construct(self, x, num_frames):
        for resnet in self.resnets:
            x = resnet(x, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class TemporalDecoder(nn.Cell):
    """Latents [B*F, in_channels, h, w] -> frames [B*F, out_channels, h*s, w*s], mixing the F frames of each clip."""

    def __init__(self, in_channels=4, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2):
        super().__init__()
        self.conv_in = Conv2d(in_channels, block_out_channels[-1], 3, padding=1)
        self.mid_block = MidBlockTemporalDecoder(
            block_out_channels[-1], block_out_channels[-1], block_out_channels[-1], layers_per_block
        )
        reversed_channels = list(reversed(block_out_channels))
        blocks = []
        out_ch = reversed_channels[0]
        for i in range(len(block_out_channels)):
            in_ch, out_ch = out_ch, reversed_channels[i]
            is_last = i == len(block_out_channels) - 1
            blocks.append(UpBlockTemporalDecoder(in_ch, out_ch, layers_per_block + 1, add_upsample=not is_last))
        self.up_blocks = nn.CellList(blocks)
        self.conv_norm_out = GroupNorm(32, block_out_channels[0], eps=1e-6)
        self.conv_out = Conv2d(block_out_channels[0], out_channels, 3, padding=1)
        self.time_conv_out = TemporalConv3d(out_channels, out_channels)

    def construct(self, z, num_frames):
        x = self.mid_block(self.conv_in(z), num_frames)
        for block in self.up_blocks:
            x = block(x, num_frames)
        x = self.conv_out(silu(self.conv_norm_out(x)))
        return _to_frames(self.time_conv_out(_to_clips(x, num_frames)))


class AutoencoderKLTemporalDecoder(nn.Cell):
    """The SVD VAE. ``encode(sample)`` gives the latent distribution's mode (unscaled); ``decode(latents, num_frames)``
    decodes [B*F, latent_channels, h, w] latents, clip by clip of ``num_frames`` frames.

    Both are plain methods that other cells may call from their ``construct`` (``num_frames`` a Python int).
    """

    def __init__(self, config=None):
        super().__init__()
        self.config = config or AutoencoderKLTemporalDecoderConfig()
        cfg = self.config
        self.latent_channels = cfg.latent_channels
        self.encoder = Encoder(
            in_channels=cfg.in_channels,
            out_channels=cfg.latent_channels,
            down_block_types=cfg.down_block_types,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            double_z=True,
        )
        self.decoder = TemporalDecoder(
            in_channels=cfg.latent_channels,
            out_channels=cfg.out_channels,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
        )
        self.quant_conv = Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)

    @classmethod
    def from_config(cls, config_dict):
        return cls(config_from_dict(AutoencoderKLTemporalDecoderConfig, config_dict))

    def encode(self, sample):
        """Images [N, in_channels, H, W] in [-1, 1] -> the posterior mean [N, latent_channels, H/s, W/s]."""
        moments = self.quant_conv(self.encoder(sample))
        return moments[:, : self.latent_channels]

    def decode(self, latents, num_frames):
        """Latents [B*F, latent_channels, h, w] (unscaled) -> frames [B*F, out_channels, h*s, w*s]; F = num_frames."""
        return self.decoder(latents, num_frames)

    def construct(self, sample, num_frames=1):
        """diffusers' ``forward`` with ``sample_posterior=False``: decode the mode of the encoded ``sample``."""
        return self.decode(self.encode(sample), num_frames)


class VaeDecoderGraph(nn.Cell):
    """The graph that is exported for decoding: latents [B*num_frames, C, h, w] -> sample [B*num_frames, 3, H, W]."""

    def __init__(self, vae, num_frames):
        super().__init__()
        self.vae = vae
        self.num_frames = int(num_frames)

    def construct(self, latents):
        return self.vae.decode(latents, self.num_frames)
