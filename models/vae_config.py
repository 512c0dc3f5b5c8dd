"""The ``config.json`` fields both VAEs (``AutoencoderKL``, ``AutoencoderKLTemporalDecoder``) share, with diffusers'
defaults, and the check they share: every block-type list names one block per ``block_out_channels`` entry."""

import dataclasses


@dataclasses.dataclass
class VaeConfig:
    """The fields both VAE configs have; ``block_type_fields`` names a subclass's block-type lists."""

    block_type_fields = ("down_block_types",)  # not a field: the lists checked against block_out_channels

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    sample_size: object = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        for name in self.block_type_fields:
            setattr(self, name, tuple(getattr(self, name)))
            if len(getattr(self, name)) != len(self.block_out_channels):
                raise ValueError(
                    f"{name} {getattr(self, name)} and block_out_channels {self.block_out_channels} "
                    "must have the same length"
                )

    @property
    def vae_scale_factor(self):
        """Pixels per latent along each side: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)
