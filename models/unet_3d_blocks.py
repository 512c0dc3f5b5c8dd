"""Blocks of diffusers' ``UNet3DConditionModel`` (ModelScope text-to-video), in export-safe layers.

Mirrors ``unets/unet_3d_blocks.py`` (``CrossAttnDownBlock3D``, ``DownBlock3D``, ``UNetMidBlock3DCrossAttn``,
``UpBlock3D``, ``CrossAttnUpBlock3D``), ``resnet.py`` (``TemporalConvLayer``),
``transformers/transformer_2d.py`` (``Transformer2DModel``, continuous input) and
``transformers/transformer_temporal.py`` (``TransformerTemporalModel``). The resnet, attention, feed-forward and
resampling cells are the shared ones (``resnet``, ``attention``, ``resampling``), the per-layer loops
``unet_common``'s. Attribute paths equal diffusers' module paths, so parameter names equal the checkpoint keys.

Activations are [batch * frames, C, H, W] as in diffusers; the temporal layers regroup them by ``num_frames`` (a
Python int taken from the static input shape). Dropout is inference-time identity.

Head counts follow diffusers' naming quirk: a block built with ``num_attention_heads=n`` (which the UNet takes from
``attention_head_dim``) has ``channels // n`` heads of ``n`` channels each.
"""

from mindspore import nn

from .attention import BasicTransformerBlock, feed_forward
from .layers import Conv2d, GroupNorm, Linear, TemporalConv3d, clips_to_frames, frames_to_clips, silu
from .resampling import Downsample2D, Upsample2D
from .resnet import ResnetBlock2D
from .unet_common import UNetDownBlock, UNetMidBlock, UNetUpBlock, down_resnet_in_channels, up_resnet_in_channels


class TemporalConvLayer(nn.Cell):
    """Four GroupNorm -> SiLU -> Conv3d (3, 1, 1) stages across frames, added to the input.

    Checkpoint layout: ``conv1`` = [GroupNorm, SiLU, Conv3d], ``conv2..4`` = [GroupNorm, SiLU, Dropout, Conv3d];
    the parameter-free entries are ``nn.Identity`` here so the indices match.
    """

    def __init__(self, in_dim, out_dim=None, norm_num_groups=32):
        super().__init__()
        out_dim = out_dim or in_dim
        self.conv1 = nn.CellList([GroupNorm(norm_num_groups, in_dim), nn.Identity(), TemporalConv3d(in_dim, out_dim)])
        self.conv2 = self._stage(out_dim, in_dim, norm_num_groups)
        self.conv3 = self._stage(out_dim, in_dim, norm_num_groups)
        self.conv4 = self._stage(out_dim, in_dim, norm_num_groups)

    @staticmethod
    def _stage(channels, out_channels, groups):
        return nn.CellList(
            [GroupNorm(groups, channels), nn.Identity(), nn.Identity(), TemporalConv3d(channels, out_channels)]
        )

    def construct(self, x, num_frames):
        identity = frames_to_clips(x, num_frames)
        h = self.conv1[2](silu(self.conv1[0](identity)))
        h = self.conv2[3](silu(self.conv2[0](h)))
        h = self.conv3[3](silu(self.conv3[0](h)))
        h = self.conv4[3](silu(self.conv4[0](h)))
        return clips_to_frames(identity + h)


class SelfAttentionTwiceBlock(BasicTransformerBlock):
    """``BasicTransformerBlock(double_self_attention=True)``: ``attn2`` is a second self-attention (on ``norm2`` of
    the running state) instead of cross-attention. Same parameters as the spatial block without a context width."""

    def __init__(self, dim, heads, dim_head):
        super().__init__(dim, heads, dim_head, None)

    def construct(self, x):
        h = self.norm1(x)
        x = self.attn1(h, h) + x
        h = self.norm2(x)
        x = self.attn2(h, h) + x
        return feed_forward(self.ff, self.norm3(x), self.chunk_size) + x


class Transformer2DModel(nn.Cell):
    """Spatial transformer on each frame: GroupNorm (eps 1e-6), ``proj_in``, transformer blocks with
    cross-attention to the text, ``proj_out``, residual. ``use_linear_projection`` picks Linear (on tokens) or 1x1
    Conv2d (on the feature map) projections, as diffusers does; UNet3D builds it with linear projections."""

    def __init__(
        self, num_attention_heads, attention_head_dim, in_channels, num_layers=1, cross_attention_dim=None,
        norm_num_groups=32, use_linear_projection=True,
    ):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.inner = inner
        self.num_layers = num_layers
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = Linear(in_channels, inner)
            self.proj_out = Linear(inner, in_channels)
        else:
            self.proj_in = Conv2d(in_channels, inner, 1)
            self.proj_out = Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.CellList(
            [
                BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, cross_attention_dim)
                for _ in range(num_layers)
            ]
        )

    def construct(self, x, context):
        n, c, height, width = x.shape
        residual = x
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.transpose(0, 2, 3, 1).reshape(n, height * width, c))
        else:
            h = self.proj_in(h).transpose(0, 2, 3, 1).reshape(n, height * width, self.inner)
        for i in range(self.num_layers):
            h = self.transformer_blocks[i](h, context)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(n, height, width, c).transpose(0, 3, 1, 2)
        else:
            h = self.proj_out(h.reshape(n, height, width, self.inner).transpose(0, 3, 1, 2))
        return h + residual


class TransformerTemporalModel(nn.Cell):
    """Attention across frames at each spatial position: GroupNorm over [B, C, F, H, W] (eps 1e-6), ``proj_in`` on
    [B*H*W, F, C] tokens, self-attention-twice blocks, ``proj_out``, residual. No cross-attention: diffusers builds
    these blocks with ``double_self_attention=True``, so a given ``cross_attention_dim`` is unused."""

    def __init__(self, num_attention_heads, attention_head_dim, in_channels, num_layers=1, norm_num_groups=32):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.num_layers = num_layers
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        self.proj_in = Linear(in_channels, inner)
        self.transformer_blocks = nn.CellList(
            [SelfAttentionTwiceBlock(inner, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.proj_out = Linear(inner, in_channels)

    def construct(self, x, num_frames):
        bf, c, height, width = x.shape
        b = bf // num_frames
        residual = x
        h = self.norm(frames_to_clips(x, num_frames))  # [B, C, F, H, W]
        h = h.transpose(0, 3, 4, 2, 1).reshape(b * height * width, num_frames, c)
        h = self.proj_in(h)
        for i in range(self.num_layers):
            h = self.transformer_blocks[i](h)
        h = self.proj_out(h).reshape(b, height, width, num_frames, c).transpose(0, 3, 4, 1, 2)
        return h.reshape(bf, c, height, width) + residual


def _attention_pair(channels, num_attention_heads, cross_attention_dim, groups):
    """The spatial and the temporal transformer after one resnet: ``channels // n`` heads of ``n`` channels."""
    heads = channels // num_attention_heads
    spatial = Transformer2DModel(
        heads, num_attention_heads, channels, cross_attention_dim=cross_attention_dim, norm_num_groups=groups
    )
    temporal = TransformerTemporalModel(heads, num_attention_heads, channels, norm_num_groups=groups)
    return spatial, temporal


class _Layers3D:
    """The layer cells of the ModelScope blocks: ``resnets[i]`` -> ``temp_convs[i]`` is a resnet stage,
    ``attentions[i]`` (spatial, text cross-attention) -> ``temp_attentions[i]`` (temporal) a transformer stage;
    see ``unet_common``."""

    def _build(self, in_channels_per_layer, out_channels, temb_channels, eps, groups, num_attention_heads,
               cross_attention_dim, num_transformer_stages, output_scale_factor=1.0):
        self.resnets = nn.CellList(
            [
                ResnetBlock2D(c, out_channels, temb_channels, groups=groups, eps=eps,
                              output_scale_factor=output_scale_factor)
                for c in in_channels_per_layer
            ]
        )
        self.temp_convs = nn.CellList(
            [TemporalConvLayer(out_channels, out_channels, norm_num_groups=groups) for _ in in_channels_per_layer]
        )
        self.attentions = None
        self.temp_attentions = None
        if num_transformer_stages:
            pairs = [
                _attention_pair(out_channels, num_attention_heads, cross_attention_dim, groups)
                for _ in range(num_transformer_stages)
            ]
            self.attentions = nn.CellList([p[0] for p in pairs])
            self.temp_attentions = nn.CellList([p[1] for p in pairs])

    def _resnet(self, i, x, temb, num_frames):
        return self.temp_convs[i](self.resnets[i](x, temb), num_frames)

    def _attend(self, i, x, context, num_frames):
        return self.temp_attentions[i](self.attentions[i](x, context), num_frames)


class DownBlock3D(_Layers3D, UNetDownBlock):
    """``num_layers`` (resnet, temporal conv) pairs, then an optional stride-2 downsampler."""

    def __init__(
        self, in_channels, out_channels, temb_channels, num_layers=1, resnet_eps=1e-6, resnet_groups=32,
        num_attention_heads=1, cross_attention_dim=1280, add_downsample=True,
    ):
        super().__init__()
        self.num_layers = num_layers
        self._build(
            down_resnet_in_channels(in_channels, out_channels, num_layers), out_channels, temb_channels, resnet_eps,
            resnet_groups, num_attention_heads, cross_attention_dim, num_layers if self.has_cross_attention else 0,
        )
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if add_downsample else None


class CrossAttnDownBlock3D(DownBlock3D):
    """``DownBlock3D`` with a spatial (text cross-attention) and a temporal transformer after each temporal conv."""

    has_cross_attention = True


class UpBlock3D(_Layers3D, UNetUpBlock):
    """``num_layers`` (resnet, temporal conv) pairs fed with skip connections, then an optional upsampler."""

    def __init__(
        self, in_channels, prev_output_channel, out_channels, temb_channels, num_layers=1, resnet_eps=1e-6,
        resnet_groups=32, num_attention_heads=1, cross_attention_dim=1280, add_upsample=True,
    ):
        super().__init__()
        self.num_layers = num_layers
        self._build(
            up_resnet_in_channels(in_channels, prev_output_channel, out_channels, num_layers), out_channels,
            temb_channels, resnet_eps, resnet_groups, num_attention_heads, cross_attention_dim,
            num_layers if self.has_cross_attention else 0,
        )
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None


class CrossAttnUpBlock3D(UpBlock3D):
    """``UpBlock3D`` with a spatial (text cross-attention) and a temporal transformer after each temporal conv."""

    has_cross_attention = True


class UNetMidBlock3DCrossAttn(_Layers3D, UNetMidBlock):
    """resnet -> temporal conv, then ``num_layers`` times (spatial transformer, temporal transformer, resnet,
    temporal conv), at the bottom resolution. Resnet outputs are divided by ``output_scale_factor``."""

    def __init__(
        self, in_channels, temb_channels, num_layers=1, resnet_eps=1e-6, resnet_groups=32, num_attention_heads=1,
        output_scale_factor=1.0, cross_attention_dim=1280,
    ):
        super().__init__()
        self.num_layers = num_layers
        self._build(
            [in_channels] * (num_layers + 1), in_channels, temb_channels, resnet_eps, resnet_groups,
            num_attention_heads, cross_attention_dim, num_layers, output_scale_factor,
        )


DOWN_BLOCKS = {"DownBlock3D": DownBlock3D, "CrossAttnDownBlock3D": CrossAttnDownBlock3D}
UP_BLOCKS = {"UpBlock3D": UpBlock3D, "CrossAttnUpBlock3D": CrossAttnUpBlock3D}
