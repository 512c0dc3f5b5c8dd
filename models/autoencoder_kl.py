"""diffusers' ``AutoencoderKL``: the per-image VAE of ModelScope text-to-video (and Stable Diffusion).

The model is the shared 2-D ``Encoder`` / ``Decoder`` (``vae_blocks.py``) plus the 1x1 convolutions ``quant_conv``
(on the encoder's moments) and ``post_quant_conv`` (on the latents), each present when the config says so. Every image
is processed on its own, so a video's frames are flattened into the batch, [B*F, C, H, W], and any slice of the batch
decodes to exactly the same frames. Tiling and slicing are runtime scheduling choices and are not part of the graphs.

Latents in and out are *unscaled*: pipelines divide by ``config.scaling_factor`` before ``decode`` (as diffusers'
``TextToVideoSDPipeline.decode_latents`` does) and multiply after ``encode``.
"""

import dataclasses
import logging
from typing import Optional

from mindspore import nn

from .layers import Conv2d
from .loading import config_from_dict
from .vae_blocks import (  # noqa: F401 -- the graphs: part of this module's API (the exporter, the tests)
    Decoder,
    VaeDecoderGraph,
    VaeEncoderGraph,
    vae_encoder,
)
from .vae_config import VaeConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AutoencoderKLConfig(VaeConfig):
    """The ``config.json`` of an ``AutoencoderKL`` (diffusers' defaults): the shared VAE fields and these."""

    block_type_fields = ("down_block_types", "up_block_types")

    up_block_types: tuple = ("UpDecoderBlock2D",)
    act_fn: str = "silu"
    norm_num_groups: int = 32
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True


class AutoencoderKL(nn.Cell):
    """The image VAE. ``encode(sample)`` gives the latent distribution's mode (its mean, unscaled);
    ``decode(latents)`` gives images. Both are plain methods that other cells may call from their ``construct``."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config or AutoencoderKLConfig()
        cfg = self.config
        self.latent_channels = cfg.latent_channels
        common = dict(
            norm_num_groups=cfg.norm_num_groups,
            act_fn=cfg.act_fn,
            mid_block_add_attention=cfg.mid_block_add_attention,
        )
        self.encoder = vae_encoder(cfg, **common)
        self.decoder = Decoder(
            in_channels=cfg.latent_channels,
            out_channels=cfg.out_channels,
            up_block_types=cfg.up_block_types,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            **common,
        )
        moments = 2 * cfg.latent_channels
        self.quant_conv = Conv2d(moments, moments, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None

    @classmethod
    def from_config(cls, config_dict):
        return cls(config_from_dict(AutoencoderKLConfig, config_dict))

    def encode(self, sample):
        """Images [N, in_channels, H, W] in [-1, 1] -> the posterior mean [N, latent_channels, H/s, W/s]."""
        moments = self.encoder(sample)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments[:, : self.latent_channels]

    def decode(self, latents):
        """Latents [N, latent_channels, h, w] (unscaled) -> images [N, out_channels, h*s, w*s]."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def construct(self, sample):
        """diffusers' ``forward`` with ``sample_posterior=False``: decode the mode of the encoded ``sample``."""
        return self.decode(self.encode(sample))
