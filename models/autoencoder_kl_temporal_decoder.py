"""diffusers' ``AutoencoderKLTemporalDecoder``: the Stable Video Diffusion VAE.

The encoder is the 2-D VAE ``Encoder`` (``vae_blocks.py``), applied per frame. The decoder interleaves per-frame 2-D
resnets with temporal resnets (kernel (3, 1, 1) convolutions over the frames of each clip) blended by a learned
factor, and ends in a temporal convolution ``time_conv_out``. Frames arrive flattened as [B*F, C, H, W]; ``num_frames``
(F) is a Python int, so every shape is static when the graph is compiled.
"""

import dataclasses
import logging

from mindspore import nn

from .layers import Conv2d, GroupNorm, TemporalConv3d, clips_to_frames, frames_to_clips, silu
from .loading import config_from_dict
from .resampling import Upsample2D
from .resnet import SpatioTemporalResBlock
from .vae_blocks import (  # noqa: F401 -- the graphs: part of this module's API (the exporter, the tests)
    AttentionBlock,
    VaeDecoderGraph,
    VaeEncoderGraph,
    block_channels,
    vae_encoder,
)
from .vae_config import VaeConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AutoencoderKLTemporalDecoderConfig(VaeConfig):
    """The ``config.json`` of an ``AutoencoderKLTemporalDecoder`` (diffusers' defaults): the shared VAE fields."""


def _resnet(in_channels, out_channels):
    """The decoder's ``SpatioTemporalResBlock``: no time embedding, temporal eps 1e-5, and a
    ``TemporalAlphaBlender`` starting at alpha = sigmoid(0)."""
    return SpatioTemporalResBlock(
        in_channels, out_channels, eps=1e-6, temporal_eps=1e-5, merge_factor=0.0, switch_spatial_to_temporal_mix=True
    )


class MidBlockTemporalDecoder(nn.Cell):
    """resnets[0], then (attentions[0], resnets[1]) when there are two or more resnets.

    diffusers pairs ``resnets[1:]`` with its single attention, so resnets beyond the second exist in the checkpoint
    but are never applied; this block does the same.
    """

    def __init__(self, in_channels, out_channels, attention_head_dim=512, num_layers=1):
        super().__init__()
        self.resnets = nn.CellList(
            [_resnet(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)]
        )
        self.attentions = nn.CellList([AttentionBlock(in_channels, in_channels // attention_head_dim, 32, 1e-6)])
        self.use_attention = num_layers > 1

    def construct(self, x, num_frames):
        x = self.resnets[0](x, num_frames)
        if self.use_attention:
            x = self.resnets[1](self.attentions[0](x), num_frames)
        return x


class UpBlockTemporalDecoder(nn.Cell):
    """``num_layers`` decoder ``SpatioTemporalResBlock``s, then an optional ``Upsample2D``."""

    def __init__(self, in_channels, out_channels, num_layers=1, add_upsample=True):
        super().__init__()
        self.resnets = nn.CellList(
            [_resnet(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)]
        )
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None

    def construct(self, x, num_frames):
        for resnet in self.resnets:
            x = resnet(x, num_frames)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class TemporalDecoder(nn.Cell):
    """Latents [B*F, in_channels, h, w] -> frames [B*F, out_channels, h*s, w*s], mixing the F frames of each clip."""

    def __init__(self, in_channels=4, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2):
        super().__init__()
        self.conv_in = Conv2d(in_channels, block_out_channels[-1], 3, padding=1)
        self.mid_block = MidBlockTemporalDecoder(
            block_out_channels[-1], block_out_channels[-1], block_out_channels[-1], layers_per_block
        )
        blocks = [
            UpBlockTemporalDecoder(in_ch, out_ch, layers_per_block + 1, add_upsample=resample)
            for in_ch, out_ch, resample in block_channels(list(reversed(block_out_channels)))
        ]
        self.up_blocks = nn.CellList(blocks)
        self.conv_norm_out = GroupNorm(32, block_out_channels[0], eps=1e-6)
        self.conv_out = Conv2d(block_out_channels[0], out_channels, 3, padding=1)
        self.time_conv_out = TemporalConv3d(out_channels, out_channels)

    def construct(self, z, num_frames):
        x = self.mid_block(self.conv_in(z), num_frames)
        for block in self.up_blocks:
            x = block(x, num_frames)
        x = self.conv_out(silu(self.conv_norm_out(x)))
        return clips_to_frames(self.time_conv_out(frames_to_clips(x, num_frames)))


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
        self.encoder = vae_encoder(cfg)
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
