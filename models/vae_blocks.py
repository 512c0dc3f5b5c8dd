"""2-D building blocks of diffusers' VAEs (``autoencoders/vae.py`` and the blocks it uses), in export-safe layers.

Shared by the image VAE (``AutoencoderKL``: ``Encoder`` + ``Decoder``) and the video VAE
(``AutoencoderKLTemporalDecoder``: ``Encoder`` + a temporal decoder). Attribute paths equal diffusers' module paths,
so the parameter names equal the checkpoint keys. Only the configurations the published VAEs use are built:
SiLU activations, ``time_embedding_norm="default"`` without a time embedding, GroupNorm everywhere.
"""

from mindspore import nn

from .layers import Conv2d, GroupNorm, Linear, Upsample2x, attention, silu

_ACTIVATIONS = ("silu", "swish")


def _check_act(act_fn):
    if act_fn not in _ACTIVATIONS:
        raise ValueError(f"act_fn={act_fn!r} is not supported; the VAE blocks implement {_ACTIVATIONS}")


class ResnetBlock2D(nn.Cell):
    """diffusers' ``ResnetBlock2D`` without a time embedding: norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus
    a 1x1 ``conv_shortcut`` when the channel count changes."""

    def __init__(self, in_channels, out_channels=None, groups=32, eps=1e-6, output_scale_factor=1.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def construct(self, x):
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class AttentionBlock(nn.Cell):
    """diffusers' ``Attention`` as the VAE uses it: GroupNorm, self-attention over the H*W positions of [N, C, H, W],
    output projection ``to_out.0``, residual connection."""

    def __init__(self, channels, heads=1, groups=32, eps=1e-6, rescale_output_factor=1.0):
        super().__init__()
        self.heads = heads
        self.max_scores_mb = None  # see layers.set_attention_slicing
        self.group_norm = GroupNorm(groups, channels, eps=eps)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.CellList([Linear(channels, channels)])
        self.rescale_output_factor = rescale_output_factor

    def construct(self, x):
        n, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(n, c, h * w).transpose(0, 2, 1)
        out = attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), self.heads, self.max_scores_mb)
        out = self.to_out[0](out).transpose(0, 2, 1).reshape(n, c, h, w)
        out = out + x
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class Downsample2D(nn.Cell):
    """The VAE encoder's ``Downsample2D(padding=0)``: a 3x3 stride-2 convolution over the input padded with one
    zero row at the bottom and one zero column on the right (``F.pad(x, (0, 1, 0, 1))``)."""

    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, stride=2, padding=(0, 1, 0, 1))

    def construct(self, x):
        return self.conv(x)


class Upsample2D(nn.Cell):
    """diffusers' ``Upsample2D(use_conv=True)``: nearest 2x upsampling, then a 3x3 convolution."""

    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.upsample = Upsample2x()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)

    def construct(self, x):
        return self.conv(self.upsample(x))


class DownEncoderBlock2D(nn.Cell):
    def __init__(self, in_channels, out_channels, num_layers=1, groups=32, eps=1e-6, add_downsample=True):
        super().__init__()
        self.resnets = nn.CellList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, eps)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if add_downsample else None

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Cell):
    def __init__(self, in_channels, out_channels, num_layers=1, groups=32, eps=1e-6, add_upsample=True):
        super().__init__()
        self.resnets = nn.CellList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, eps)
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Cell):
    """diffusers' ``UNetMidBlock2D`` without a time embedding: resnet, then ``num_layers`` x (attention, resnet)."""

    def __init__(self, in_channels, num_layers=1, groups=32, eps=1e-6, attention_head_dim=None, add_attention=True):
        super().__init__()
        heads = in_channels // (attention_head_dim or in_channels)
        self.num_layers = num_layers
        self.add_attention = add_attention
        self.resnets = nn.CellList(
            [ResnetBlock2D(in_channels, in_channels, groups, eps) for _ in range(num_layers + 1)]
        )
        self.attentions = nn.CellList(
            [AttentionBlock(in_channels, heads, groups, eps) for _ in range(num_layers)] if add_attention else []
        )

    def construct(self, x):
        x = self.resnets[0](x)
        for i in range(self.num_layers):
            if self.add_attention:
                x = self.attentions[i](x)
            x = self.resnets[i + 1](x)
        return x


def _check_block_types(types, expected, what):
    bad = [t for t in types if t != expected]
    if bad:
        raise ValueError(f"{what} {bad} are not supported; the VAE implements only {expected!r}")


class Encoder(nn.Cell):
    """diffusers' VAE ``Encoder``: [N, in_channels, H, W] -> [N, 2*out_channels (double_z), H/2^k, W/2^k]."""

    def __init__(
        self,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        block_out_channels=(64,),
        layers_per_block=2,
        norm_num_groups=32,
        act_fn="silu",
        double_z=True,
        mid_block_add_attention=True,
    ):
        super().__init__()
        _check_act(act_fn)
        _check_block_types(down_block_types, "DownEncoderBlock2D", "down_block_types")
        self.conv_in = Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        blocks = []
        out_ch = block_out_channels[0]
        for i in range(len(down_block_types)):
            in_ch, out_ch = out_ch, block_out_channels[i]
            blocks.append(
                DownEncoderBlock2D(
                    in_ch, out_ch, layers_per_block, norm_num_groups, 1e-6,
                    add_downsample=i != len(block_out_channels) - 1,
                )
            )
        self.down_blocks = nn.CellList(blocks)
        self.mid_block = UNetMidBlock2D(
            block_out_channels[-1], 1, norm_num_groups, 1e-6, block_out_channels[-1], mid_block_add_attention
        )
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[-1], eps=1e-6)
        self.conv_out = Conv2d(block_out_channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    def construct(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class Decoder(nn.Cell):
    """diffusers' VAE ``Decoder`` (``norm_type="group"``): [N, in_channels, h, w] -> [N, out_channels, h*2^k, w*2^k]."""

    def __init__(
        self,
        in_channels=3,
        out_channels=3,
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(64,),
        layers_per_block=2,
        norm_num_groups=32,
        act_fn="silu",
        mid_block_add_attention=True,
    ):
        super().__init__()
        _check_act(act_fn)
        _check_block_types(up_block_types, "UpDecoderBlock2D", "up_block_types")
        self.conv_in = Conv2d(in_channels, block_out_channels[-1], 3, padding=1)
        self.mid_block = UNetMidBlock2D(
            block_out_channels[-1], 1, norm_num_groups, 1e-6, block_out_channels[-1], mid_block_add_attention
        )
        reversed_channels = list(reversed(block_out_channels))
        blocks = []
        out_ch = reversed_channels[0]
        for i in range(len(up_block_types)):
            in_ch, out_ch = out_ch, reversed_channels[i]
            blocks.append(
                UpDecoderBlock2D(
                    in_ch, out_ch, layers_per_block + 1, norm_num_groups, 1e-6,
                    add_upsample=i != len(block_out_channels) - 1,
                )
            )
        self.up_blocks = nn.CellList(blocks)
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[0], eps=1e-6)
        self.conv_out = Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def construct(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


class VaeEncoderGraph(nn.Cell):
    """The graph that is exported for encoding: sample [N, 3, H, W] -> latent [N, latent_channels, H/s, W/s]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def construct(self, sample):
        return self.vae.encode(sample)
