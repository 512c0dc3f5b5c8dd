"""The 2x down- and up-samplers of the UNets and VAEs (diffusers' ``Downsample2D`` / ``Upsample2D`` with
``use_conv=True``), in export-safe layers. The convolution is ``conv``, as in the checkpoints."""

from mindspore import nn

from .layers import Conv2d, Upsample2x


class Downsample2D(nn.Cell):
    """A 3x3 stride-2 convolution. ``padding=1`` (the UNets) pads one zero on every side; ``padding=0`` (the VAE
    encoder) pads one zero row at the bottom and one zero column on the right, as diffusers' ``F.pad(x, (0, 1, 0, 1))``.
    """

    def __init__(self, channels, out_channels=None, padding=1):
        super().__init__()
        pad = (0, 1, 0, 1) if padding == 0 else padding
        self.conv = Conv2d(channels, out_channels or channels, 3, stride=2, padding=pad)

    def construct(self, x):
        return self.conv(x)


class Upsample2D(nn.Cell):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution with padding 1."""

    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.upsample = Upsample2x()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)

    def construct(self, x):
        return self.conv(self.upsample(x))
