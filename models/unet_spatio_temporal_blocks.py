"""Blocks of diffusers' ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion), in export-safe layers.

Mirrors ``unets/unet_3d_blocks.py`` (the ``*SpatioTemporal`` blocks), ``attention.py``
(``TemporalBasicTransformerBlock``) and ``transformers/transformer_temporal.py`` (``TransformerSpatioTemporalModel``);
the resnets, attention and resampling cells are the shared ones (``resnet``, ``attention``, ``resampling``), the
per-layer loops ``unet_common``'s. Attribute paths equal diffusers' module paths, so parameter names equal the
checkpoint keys.

Activations are [batch * frames, C, H, W] as in diffusers; every block also receives ``num_frames`` (a Python int
taken from the static input shape). The SVD pipeline always passes an all-zeros ``image_only_indicator``, for which
diffusers' ``AlphaBlender`` reduces to ``SpatialAlphaBlender``; the indicator is not an input.
"""

import mindspore as ms
from mindspore import nn, ops

from .attention import BasicTransformerBlock, FeedForward, feed_forward
from .layers import GroupNorm, LayerNorm, Linear, TimestepEmbedding, Timesteps
from .resampling import Downsample2D, Upsample2D
from .resnet import SpatialAlphaBlender, SpatioTemporalResBlock
from .unet_common import (
    UNetDownBlock,
    UNetMidBlock,
    UNetUpBlock,
    down_resnet_in_channels,
    up_resnet_in_channels,
)


def _per_layer(value, num_layers):
    """``transformer_layers_per_block`` of one block: an int for every layer, or a per-layer sequence."""
    if isinstance(value, int):
        return [value] * num_layers
    if len(value) < num_layers:
        raise ValueError(f"transformer_layers_per_block={value!r} names fewer than the block's {num_layers} layers")
    return list(value)[:num_layers]


class TemporalBasicTransformerBlock(BasicTransformerBlock):
    """diffusers' ``TemporalBasicTransformerBlock``: attention across frames at each spatial position.

    Input and output are [B*F, S, C]; internally [B*S, F, C]. ``time_mix_inner_dim == dim`` in SVD, so both
    feed-forwards are residual (diffusers' ``is_res``). ``context`` is the first frame's cross-attention context,
    [B, L, D]; diffusers repeats it for every spatial position. The cells are the spatial block's, after a
    residual ``norm_in`` -> ``ff_in``.
    """

    def _build_input(self, dim):
        self.norm_in = LayerNorm(dim)
        self.ff_in = FeedForward(dim, dim_out=dim)

    def construct(self, x, num_frames, context):
        bf, seq, c = x.shape
        b = bf // num_frames
        x = x.reshape(b, num_frames, seq, c).transpose(0, 2, 1, 3).reshape(b * seq, num_frames, c)
        x = feed_forward(self.ff_in, self.norm_in(x), self.chunk_size) + x
        h = self.norm1(x)
        x = self.attn1(h, h) + x
        x = self.attn2.add_to(x, context, self.norm2)  # one context per video, shared by its positions
        x = feed_forward(self.ff, self.norm3(x), self.chunk_size) + x
        return x.reshape(b, seq, num_frames, c).transpose(0, 2, 1, 3).reshape(bf, seq, c)


class TransformerSpatioTemporalModel(nn.Cell):
    """Spatial transformer per frame plus temporal transformer across frames (with a learned frame-index
    embedding), blended by ``time_mixer``; GroupNorm in, linear projections in and out, residual."""

    def __init__(self, heads, dim_head, in_channels, num_layers=1, cross_attention_dim=None):
        super().__init__()
        inner = heads * dim_head
        if inner != in_channels:
            raise ValueError(f"heads * head_dim = {inner} must equal in_channels = {in_channels} (as in SVD)")
        self.num_layers = num_layers
        self.norm = GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = Linear(in_channels, inner)
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim) for _ in range(num_layers)]
        )
        self.temporal_transformer_blocks = nn.CellList(
            [TemporalBasicTransformerBlock(inner, heads, dim_head, cross_attention_dim) for _ in range(num_layers)]
        )
        self.time_pos_embed = TimestepEmbedding(in_channels, in_channels * 4, out_dim=in_channels)
        self.time_proj = Timesteps(in_channels, True, 0)
        self.time_mixer = SpatialAlphaBlender(0.5)
        self.proj_out = Linear(inner, in_channels)

    def construct(self, x, context, num_frames):
        bf, c, height, width = x.shape
        b = bf // num_frames
        seq = height * width
        # cross-attention context of the temporal blocks: the first frame's
        length, dim = context.shape[1], context.shape[2]
        first = context.reshape(b, num_frames, length, dim)[:, 0]

        residual = x
        h = self.norm(x).transpose(0, 2, 3, 1).reshape(bf, seq, c)
        h = self.proj_in(h)

        frames = ops.arange(num_frames).astype(ms.float32)
        frame_emb = self.time_pos_embed(self.time_proj(frames).astype(h.dtype))  # [F, C]
        frame_emb = ops.broadcast_to(frame_emb.reshape(1, num_frames, 1, c), (b, num_frames, 1, c))
        frame_emb = frame_emb.reshape(bf, 1, c)

        for i in range(self.num_layers):
            h = self.transformer_blocks[i](h, context)
            mixed = self.temporal_transformer_blocks[i](h + frame_emb, num_frames, first)
            h = self.time_mixer(h, mixed)

        h = self.proj_out(h).reshape(bf, height, width, c).transpose(0, 3, 1, 2)
        return h + residual


def _resnets(in_channels_per_layer, out_channels, temb_channels, eps):
    return nn.CellList(
        [SpatioTemporalResBlock(c, out_channels, temb_channels, eps=eps) for c in in_channels_per_layer]
    )


def _transformers(channels, num_layers, transformer_layers_per_block, num_attention_heads, cross_attention_dim):
    """One ``TransformerSpatioTemporalModel`` per layer, each of ``num_attention_heads`` heads over ``channels`` and
    of that layer's count of transformer layers."""
    heads = num_attention_heads
    return nn.CellList(
        [
            TransformerSpatioTemporalModel(heads, channels // heads, channels, n, cross_attention_dim)
            for n in _per_layer(transformer_layers_per_block, num_layers)
        ]
    )


class _SpatioTemporalLayers:
    """The layer cells of the SVD blocks: ``resnets[i]`` (``SpatioTemporalResBlock``) and ``attentions[i]``
    (``TransformerSpatioTemporalModel``, in the blocks with cross-attention); see ``unet_common``."""

    def _build(self, in_channels_per_layer, out_channels, temb_channels, eps, attention=None):
        """One resnet per entry of ``in_channels_per_layer``; with ``attention`` = (transformer_layers_per_block,
        num_attention_heads, cross_attention_dim), a transformer after each."""
        self.num_layers = len(in_channels_per_layer)
        self.resnets = _resnets(in_channels_per_layer, out_channels, temb_channels, eps)
        self.attentions = None if attention is None else _transformers(out_channels, self.num_layers, *attention)

    def _resnet(self, i, x, temb, num_frames):
        return self.resnets[i](x, num_frames, temb)

    def _attend(self, i, x, context, num_frames):
        return self.attentions[i](x, context, num_frames)


class DownBlockSpatioTemporal(_SpatioTemporalLayers, UNetDownBlock):
    """``num_layers`` SpatioTemporalResBlocks (eps 1e-5), then an optional stride-2 downsampler."""

    def __init__(self, in_channels, out_channels, temb_channels, num_layers=1, add_downsample=True):
        super().__init__()
        self._build(down_resnet_in_channels(in_channels, out_channels, num_layers), out_channels, temb_channels, 1e-5)
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if add_downsample else None


class CrossAttnDownBlockSpatioTemporal(_SpatioTemporalLayers, UNetDownBlock):
    """Like ``DownBlockSpatioTemporal`` (resnet eps 1e-6) with a ``TransformerSpatioTemporalModel`` after each
    resnet."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels,
        out_channels,
        temb_channels,
        num_layers=1,
        transformer_layers_per_block=1,
        num_attention_heads=1,
        cross_attention_dim=1280,
        add_downsample=True,
    ):
        super().__init__()
        attention = (transformer_layers_per_block, num_attention_heads, cross_attention_dim)
        self._build(
            down_resnet_in_channels(in_channels, out_channels, num_layers), out_channels, temb_channels, 1e-6, attention
        )
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if add_downsample else None


class UNetMidBlockSpatioTemporal(_SpatioTemporalLayers, UNetMidBlock):
    """resnet, then (transformer, resnet) ``num_layers`` times, all at the bottom resolution (resnet eps 1e-5)."""

    def __init__(
        self, in_channels, temb_channels, num_layers=1, transformer_layers_per_block=1, num_attention_heads=1,
        cross_attention_dim=1280,
    ):
        super().__init__()
        self.num_layers = num_layers
        self.resnets = _resnets([in_channels] * (num_layers + 1), in_channels, temb_channels, 1e-5)
        self.attentions = _transformers(
            in_channels, num_layers, transformer_layers_per_block, num_attention_heads, cross_attention_dim
        )


class UpBlockSpatioTemporal(_SpatioTemporalLayers, UNetUpBlock):
    """``num_layers`` SpatioTemporalResBlocks fed with skip connections, then an optional upsampler."""

    def __init__(
        self, in_channels, prev_output_channel, out_channels, temb_channels, num_layers=1, resnet_eps=1e-6,
        add_upsample=True,
    ):
        super().__init__()
        ins = up_resnet_in_channels(in_channels, prev_output_channel, out_channels, num_layers)
        self._build(ins, out_channels, temb_channels, resnet_eps)
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None


class CrossAttnUpBlockSpatioTemporal(_SpatioTemporalLayers, UNetUpBlock):
    """Like ``UpBlockSpatioTemporal`` with a ``TransformerSpatioTemporalModel`` after each resnet."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels,
        out_channels,
        prev_output_channel,
        temb_channels,
        num_layers=1,
        transformer_layers_per_block=1,
        resnet_eps=1e-6,
        num_attention_heads=1,
        cross_attention_dim=1280,
        add_upsample=True,
    ):
        super().__init__()
        ins = up_resnet_in_channels(in_channels, prev_output_channel, out_channels, num_layers)
        attention = (transformer_layers_per_block, num_attention_heads, cross_attention_dim)
        self._build(ins, out_channels, temb_channels, resnet_eps, attention)
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None


DOWN_BLOCKS = {
    "DownBlockSpatioTemporal": DownBlockSpatioTemporal,
    "CrossAttnDownBlockSpatioTemporal": CrossAttnDownBlockSpatioTemporal,
}
UP_BLOCKS = {
    "UpBlockSpatioTemporal": UpBlockSpatioTemporal,
    "CrossAttnUpBlockSpatioTemporal": CrossAttnUpBlockSpatioTemporal,
}
