"""2-D building blocks of diffusers' VAEs (``autoencoders/vae.py`` and the blocks it uses), in export-safe layers.

Shared by the image VAE (``AutoencoderKL``: ``Encoder`` + ``Decoder``) and the video VAE
(``AutoencoderKLTemporalDecoder``: ``Encoder`` + a temporal decoder). Attribute paths equal diffusers' module paths,
so the parameter names equal the checkpoint keys. Only the configurations the published VAEs use are built:
SiLU activations, ``time_embedding_norm="default"`` without a time embedding, GroupNorm everywhere.
"""

from mindspore import nn

from .layers import Conv2d, GroupNorm, Linear, attention, in_turn, silu
from .resampling import Downsample2D, Upsample2D
from .resnet import ResnetBlock2D

_ACTIVATIONS = ("silu", "swish")


def _check_act(act_fn):
    if act_fn not in _ACTIVATIONS:
        raise ValueError(f"act_fn={act_fn!r} is not supported; the VAE blocks implement {_ACTIVATIONS}")


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


def block_channels(block_out_channels):
    """Per block, in order: (in_channels, out_channels, resample). Each block takes the previous block's output (the
    first its own width, which ``conv_in`` gives) and every block but the last resamples."""
    n = len(block_out_channels)
    return [(block_out_channels[max(i - 1, 0)], c, i < n - 1) for i, c in enumerate(block_out_channels)]


def _resnets(in_channels, out_channels, num_layers, groups, eps):
    """``num_layers`` resnets: the first changes the channel count, the rest keep it."""
    return nn.CellList(
        [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=eps)
            for i in range(num_layers)
        ]
    )


class DownEncoderBlock2D(nn.Cell):
    """``num_layers`` resnets, then an optional ``Downsample2D(padding=0)``."""

    def __init__(self, in_channels, out_channels, num_layers=1, groups=32, eps=1e-6, add_downsample=True):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_layers, groups, eps)
        self.downsamplers = nn.CellList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def construct(self, x):
        x = in_turn(self.resnets, x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock2D(nn.Cell):
    """``num_layers`` resnets, then an optional ``Upsample2D``."""

    def __init__(self, in_channels, out_channels, num_layers=1, groups=32, eps=1e-6, add_upsample=True):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_layers, groups, eps)
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None

    def construct(self, x):
        x = in_turn(self.resnets, x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class UNetMidBlock2D(nn.Cell):
    """diffusers' ``UNetMidBlock2D`` without a time embedding: resnet, then ``num_layers`` x (attention, resnet)."""

    def __init__(self, in_channels, num_layers=1, groups=32, eps=1e-6, attention_head_dim=None, add_attention=True):
        super().__init__()
        heads = in_channels // (attention_head_dim or in_channels)
        self.num_layers = num_layers
        self.add_attention = add_attention
        self.resnets = nn.CellList(
            [ResnetBlock2D(in_channels, in_channels, groups=groups, eps=eps) for _ in range(num_layers + 1)]
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
        blocks = [
            DownEncoderBlock2D(in_ch, out_ch, layers_per_block, norm_num_groups, 1e-6, add_downsample=resample)
            for in_ch, out_ch, resample in block_channels(block_out_channels)
        ]
        self.down_blocks = nn.CellList(blocks)
        self.mid_block = UNetMidBlock2D(
            block_out_channels[-1], 1, norm_num_groups, 1e-6, block_out_channels[-1], mid_block_add_attention
        )
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[-1], eps=1e-6)
        self.conv_out = Conv2d(block_out_channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    def construct(self, x):
        x = self.mid_block(in_turn(self.down_blocks, self.conv_in(x)))
        return self.conv_out(silu(self.conv_norm_out(x)))


def vae_encoder(config, **options):
    """The ``Encoder`` of a VAE ``config`` (a ``VaeConfig``): images -> the moments of the latent distribution
    (``double_z``); ``options`` are the further ``Encoder`` arguments that config sets."""
    return Encoder(
        in_channels=config.in_channels,
        out_channels=config.latent_channels,
        down_block_types=config.down_block_types,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        double_z=True,
        **options,
    )


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
        blocks = [
            UpDecoderBlock2D(in_ch, out_ch, layers_per_block + 1, norm_num_groups, 1e-6, add_upsample=resample)
            for in_ch, out_ch, resample in block_channels(list(reversed(block_out_channels)))
        ]
        self.up_blocks = nn.CellList(blocks)
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[0], eps=1e-6)
        self.conv_out = Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def construct(self, z):
        x = in_turn(self.up_blocks, self.mid_block(self.conv_in(z)))
        return self.conv_out(silu(self.conv_norm_out(x)))


class VaeEncoderGraph(nn.Cell):
    """The graph that is exported for encoding: sample [N, 3, H, W] -> latent [N, latent_channels, H/s, W/s]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def construct(self, sample):
        return self.vae.encode(sample)


class VaeDecoderGraph(nn.Cell):
    """The graph that is exported for decoding: latents -> samples through ``vae.decode``.

    Without ``num_frames`` (the image VAE, ``AutoencoderKL``): [N, latent_channels, h, w] -> [N, 3, H, W]; frames are
    independent, so a video decodes in slices of any size N with identical results. With ``num_frames`` (the video
    VAE, ``AutoencoderKLTemporalDecoder``, which mixes the frames of each clip): [B*num_frames, C, h, w] latents,
    decoded clip by clip of ``num_frames`` frames.
    """

    def __init__(self, vae, num_frames=None):
        super().__init__()
        self.vae = vae
        self.num_frames = None if num_frames is None else int(num_frames)

    def construct(self, latents):
        if self.num_frames is None:
            return self.vae.decode(latents)
        return self.vae.decode(latents, self.num_frames)
