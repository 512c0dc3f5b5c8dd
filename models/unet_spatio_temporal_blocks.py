"""Blocks of diffusers' ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion), in export-safe layers.

Mirrors ``unets/unet_3d_blocks.py`` (the ``*SpatioTemporal`` blocks), ``resnet.py`` (``SpatioTemporalResBlock``),
``transformers/transformer_temporal.py`` (``TransformerSpatioTemporalModel``) and ``attention.py``. Attribute paths
equal diffusers' module paths, so parameter names equal the checkpoint keys.

Activations are [batch * frames, C, H, W] as in diffusers; every block also receives ``num_frames`` (a Python int
taken from the static input shape). The SVD pipeline always passes an all-zeros ``image_only_indicator``, for which
diffusers' "learned_with_images" ``AlphaBlender`` reduces to the blend factor ``sigmoid(mix_factor)``; that is what is
computed here, and the indicator is not an input.
"""

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from .layers import (
    Conv2d,
    GroupNorm,
    LayerNorm,
    Linear,
    TemporalConv3d,
    TimestepEmbedding,
    Timesteps,
    Upsample2x,
    attention,
    gelu,
    over_slices,
    silu,
)


def _per_layer(value, num_layers):
    """``transformer_layers_per_block`` of one block: an int for every layer, or a per-layer sequence."""
    if isinstance(value, int):
        return [value] * num_layers
    if len(value) < num_layers:
        raise ValueError(f"transformer_layers_per_block={value!r} names fewer than the block's {num_layers} layers")
    return list(value)[:num_layers]


class AlphaBlender(nn.Cell):
    """``AlphaBlender(merge_strategy="learned_with_images")`` for an all-zeros image_only_indicator:
    ``a * x_spatial + (1 - a) * x_temporal`` with ``a = sigmoid(mix_factor)``."""

    def __init__(self, alpha=0.5):
        super().__init__()
        self.mix_factor = Parameter(initializer(alpha, (1,), ms.float32), name="mix_factor")

    def construct(self, x_spatial, x_temporal):
        alpha = ops.sigmoid(self.mix_factor).astype(x_spatial.dtype)
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class ResnetBlock2D(nn.Cell):
    """diffusers' ``ResnetBlock2D`` (time_embedding_norm="default", SiLU, 32 groups) on [N, C, H, W]."""

    def __init__(self, in_channels, out_channels, temb_channels, eps=1e-6, groups=32):
        super().__init__()
        self.out_channels = out_channels
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def construct(self, x, temb):
        h = self.conv1(silu(self.norm1(x)))
        t = self.time_emb_proj(silu(temb))
        h = h + t.reshape(t.shape[0], self.out_channels, 1, 1)
        h = self.conv2(silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class TemporalResnetBlock(nn.Cell):
    """diffusers' ``TemporalResnetBlock`` on [B, C, F, H, W]: Conv3d kernels (3, 1, 1) mix neighbouring frames."""

    def __init__(self, channels, temb_channels, eps=1e-6):
        super().__init__()
        self.channels = channels
        self.norm1 = GroupNorm(32, channels, eps=eps)
        self.conv1 = TemporalConv3d(channels, channels)
        self.time_emb_proj = Linear(temb_channels, channels)
        self.norm2 = GroupNorm(32, channels, eps=eps)
        self.conv2 = TemporalConv3d(channels, channels)

    def construct(self, x, temb):
        b, c, f = x.shape[0], x.shape[1], x.shape[2]
        h = self.conv1(silu(self.norm1(x)))
        t = self.time_emb_proj(silu(temb))  # [B, F, C]
        h = h + t.transpose(0, 2, 1).reshape(b, c, f, 1, 1)
        h = self.conv2(silu(self.norm2(h)))
        return x + h


class SpatioTemporalResBlock(nn.Cell):
    """A per-frame ``ResnetBlock2D`` followed by a ``TemporalResnetBlock`` across frames, blended by ``time_mixer``."""

    def __init__(self, in_channels, out_channels, temb_channels, eps=1e-6):
        super().__init__()
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, temb_channels, eps=eps)
        self.temporal_res_block = TemporalResnetBlock(out_channels, temb_channels, eps=eps)
        self.time_mixer = AlphaBlender(0.5)

    def construct(self, x, temb, num_frames):
        h = self.spatial_res_block(x, temb)
        bf, c, height, width = h.shape
        b = bf // num_frames
        h = h.reshape(b, num_frames, c, height, width).transpose(0, 2, 1, 3, 4)
        mixed = self.temporal_res_block(h, temb.reshape(b, num_frames, -1))
        h = self.time_mixer(h, mixed)
        return h.transpose(0, 2, 1, 3, 4).reshape(bf, c, height, width)


class Attention(nn.Cell):
    """diffusers' ``Attention`` with its defaults (no q/k/v bias, biased ``to_out.0``), AttnProcessor2_0 math."""

    def __init__(self, query_dim, heads, dim_head, cross_attention_dim=None):
        super().__init__()
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.max_scores_mb = None  # see layers.set_attention_slicing
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(kv_dim, inner, bias=False)
        self.to_v = Linear(kv_dim, inner, bias=False)
        self.to_out = nn.CellList([Linear(inner, query_dim)])

    def construct(self, x, context):
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.max_scores_mb)
        return self.to_out[0](out)

    def single_key(self, context):
        """The output for a ``context`` of one token, [B, 1, C], the same for every query.

        A softmax over one score is exactly 1, so each query receives that token's value unchanged: ``to_q``,
        ``to_k`` and the two attention products drop out. SVD's cross-attention context is one CLIP image
        embedding, so this is what its ``attn2`` computes, at no cost per token.
        """
        return self.to_out[0](self.to_v(context))

    def shared_context(self, x, context):
        """Attention of [B*G, Lq, C] queries over a context shared by each video's G groups (frames, or positions
        in the temporal blocks), given once: [B, L, D].

        diffusers repeats the context for every frame, so it projects the same keys and values F times; here they
        are projected once per video, and the queries of all F frames attend to them together. Each query's
        softmax runs over the same keys either way, so the result is the same.
        """
        bf, lq = x.shape[0], x.shape[1]
        b = context.shape[0]
        q = self.to_q(x)
        out = attention(q.reshape(b, (bf // b) * lq, q.shape[2]), self.to_k(context), self.to_v(context), self.heads,
                        self.max_scores_mb)
        return self.to_out[0](out.reshape(bf, lq, out.shape[2]))

    def add_to(self, x, context, norm):
        """``x`` plus this cross-attention of ``norm(x)`` over ``context``.

        ``x`` is [N, L, C]; ``context`` is [N, Lc, D], or [B, Lc, D] shared by the N // B groups of each video
        (its frames; its spatial positions in the temporal blocks). A one-token context takes ``single_key``, a
        shared one ``shared_context``; ``norm`` is applied only where the queries are needed.
        """
        n, b = x.shape[0], context.shape[0]
        if context.shape[1] == 1:
            value = self.single_key(context)  # [B, 1, C], received by every query of the video's groups
            return (x.reshape(b, (n // b) * x.shape[1], x.shape[2]) + value).reshape(x.shape)
        if b != n:
            return self.shared_context(norm(x), context) + x
        return self.construct(norm(x), context) + x


class GEGLU(nn.Cell):
    """``proj`` to twice the width, then ``value * gelu(gate)`` with the exact GELU."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.dim_out = dim_out
        self.proj = Linear(dim_in, dim_out * 2)

    def construct(self, x):
        value, gate = ops.split(self.proj(x), [self.dim_out, self.dim_out], -1)  # exports as two Slices
        return value * gelu(gate)


class FeedForward(nn.Cell):
    """diffusers' ``FeedForward(activation_fn="geglu", mult=4)``: ``net.0`` GEGLU, ``net.1`` dropout, ``net.2`` out."""

    def __init__(self, dim, dim_out=None, mult=4):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.CellList([GEGLU(dim, inner), nn.Identity(), Linear(inner, dim_out or dim)])

    def construct(self, x):
        return self.net[2](self.net[0](x))


def feed_forward(ff, x, chunk_size):
    """``ff(x)``, or the same computed over slices of ``chunk_size`` along axis 1 (diffusers' forward chunking).

    The feed-forward acts on each position independently, so chunking changes peak memory, never the result.
    A last chunk shorter than ``chunk_size`` is allowed (diffusers requires divisibility).
    """
    return over_slices(ff, x, 1, chunk_size)


class BasicTransformerBlock(nn.Cell):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm with a residual (spatial)."""

    def __init__(self, dim, heads, dim_head, cross_attention_dim):
        super().__init__()
        self.chunk_size = None
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def construct(self, x, context):
        """``x`` [N, L, C]; ``context`` [N, Lc, D], or [B, Lc, D] shared by the N // B frames of each video."""
        h = self.norm1(x)
        x = self.attn1(h, h) + x
        x = self.attn2.add_to(x, context, self.norm2)
        return feed_forward(self.ff, self.norm3(x), self.chunk_size) + x


class TemporalBasicTransformerBlock(nn.Cell):
    """diffusers' ``TemporalBasicTransformerBlock``: attention across frames at each spatial position.

    Input and output are [B*F, S, C]; internally [B*S, F, C]. ``time_mix_inner_dim == dim`` in SVD, so both
    feed-forwards are residual (diffusers' ``is_res``). ``context`` is the first frame's cross-attention context,
    [B, L, D]; diffusers repeats it for every spatial position.
    """

    def __init__(self, dim, heads, dim_head, cross_attention_dim):
        super().__init__()
        self.chunk_size = None
        self.norm_in = LayerNorm(dim)
        self.ff_in = FeedForward(dim, dim_out=dim)
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

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
        self.time_mixer = AlphaBlender(0.5)
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


class Downsample2D(nn.Cell):
    """Stride-2 3x3 convolution with padding 1 (``Downsample2D(use_conv=True, padding=1, name="op")``)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def construct(self, x):
        return self.conv(x)


class Upsample2D(nn.Cell):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (``Upsample2D(use_conv=True)``)."""

    def __init__(self, channels):
        super().__init__()
        self.upsample = Upsample2x()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x):
        return self.conv(self.upsample(x))


def _down_resnets(in_channels, out_channels, temb_channels, num_layers, eps):
    """Down-block resnets: the first changes the channel count, the rest keep it."""
    return nn.CellList(
        [
            SpatioTemporalResBlock(out_channels if i else in_channels, out_channels, temb_channels, eps=eps)
            for i in range(num_layers)
        ]
    )


def _transformers(heads, channels, layers, cross_attention_dim):
    """One ``TransformerSpatioTemporalModel`` per resnet of a block, ``layers[i]`` transformer layers each."""
    return nn.CellList(
        [TransformerSpatioTemporalModel(heads, channels // heads, channels, n, cross_attention_dim) for n in layers]
    )


class DownBlockSpatioTemporal(nn.Cell):
    """``num_layers`` SpatioTemporalResBlocks, then an optional stride-2 downsampler; returns every stage's output
    for the skip connections."""

    has_cross_attention = False

    def __init__(self, in_channels, out_channels, temb_channels, num_layers=1, add_downsample=True):
        super().__init__()
        self.resnets = _down_resnets(in_channels, out_channels, temb_channels, num_layers, eps=1e-5)
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if add_downsample else None

    def construct(self, x, temb, context, num_frames):
        states = ()
        for resnet in self.resnets:
            x = resnet(x, temb, num_frames)
            states = states + (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states = states + (x,)
        return x, states


class CrossAttnDownBlockSpatioTemporal(nn.Cell):
    """Like ``DownBlockSpatioTemporal`` with a ``TransformerSpatioTemporalModel`` after each resnet."""

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
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.num_layers = num_layers
        self.resnets = _down_resnets(in_channels, out_channels, temb_channels, num_layers, eps=1e-6)
        self.attentions = _transformers(num_attention_heads, out_channels, layers, cross_attention_dim)
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if add_downsample else None

    def construct(self, x, temb, context, num_frames):
        states = ()
        for i in range(self.num_layers):
            x = self.resnets[i](x, temb, num_frames)
            x = self.attentions[i](x, context, num_frames)
            states = states + (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states = states + (x,)
        return x, states


class UNetMidBlockSpatioTemporal(nn.Cell):
    """resnet, then (transformer, resnet) ``num_layers`` times, all at the bottom resolution."""

    def __init__(
        self, in_channels, temb_channels, num_layers=1, transformer_layers_per_block=1, num_attention_heads=1,
        cross_attention_dim=1280,
    ):
        super().__init__()
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.num_layers = num_layers
        self.resnets = nn.CellList(
            [SpatioTemporalResBlock(in_channels, in_channels, temb_channels, eps=1e-5) for _ in range(num_layers + 1)]
        )
        self.attentions = _transformers(num_attention_heads, in_channels, layers, cross_attention_dim)

    def construct(self, x, temb, context, num_frames):
        x = self.resnets[0](x, temb, num_frames)
        for i in range(self.num_layers):
            x = self.attentions[i](x, context, num_frames)
            x = self.resnets[i + 1](x, temb, num_frames)
        return x


def _up_resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, eps):
    """Up-block resnets: each takes the running activation concatenated with one skip connection."""
    resnets = []
    for i in range(num_layers):
        skip_channels = in_channels if i == num_layers - 1 else out_channels
        running_channels = prev_output_channel if i == 0 else out_channels
        resnets.append(SpatioTemporalResBlock(running_channels + skip_channels, out_channels, temb_channels, eps=eps))
    return nn.CellList(resnets)


class UpBlockSpatioTemporal(nn.Cell):
    """``num_layers`` SpatioTemporalResBlocks fed with skip connections (last first), then an optional upsampler.

    ``skips`` holds this block's ``num_layers`` skip connections in the order the down path produced them.
    """

    has_cross_attention = False

    def __init__(
        self, in_channels, prev_output_channel, out_channels, temb_channels, num_layers=1, resnet_eps=1e-6,
        add_upsample=True,
    ):
        super().__init__()
        self.num_layers = num_layers
        self.resnets = _up_resnets(
            in_channels, prev_output_channel, out_channels, temb_channels, num_layers, resnet_eps
        )
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None

    def construct(self, x, skips, temb, context, num_frames):
        for i in range(self.num_layers):
            x = ops.concat((x, skips[self.num_layers - 1 - i]), 1)
            x = self.resnets[i](x, temb, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class CrossAttnUpBlockSpatioTemporal(nn.Cell):
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
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.num_layers = num_layers
        self.resnets = _up_resnets(
            in_channels, prev_output_channel, out_channels, temb_channels, num_layers, resnet_eps
        )
        self.attentions = _transformers(num_attention_heads, out_channels, layers, cross_attention_dim)
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None

    def construct(self, x, skips, temb, context, num_frames):
        for i in range(self.num_layers):
            x = ops.concat((x, skips[self.num_layers - 1 - i]), 1)
            x = self.resnets[i](x, temb, num_frames)
            x = self.attentions[i](x, context, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


DOWN_BLOCKS = {
    "DownBlockSpatioTemporal": DownBlockSpatioTemporal,
    "CrossAttnDownBlockSpatioTemporal": CrossAttnDownBlockSpatioTemporal,
}
UP_BLOCKS = {
    "UpBlockSpatioTemporal": UpBlockSpatioTemporal,
    "CrossAttnUpBlockSpatioTemporal": CrossAttnUpBlockSpatioTemporal,
}
