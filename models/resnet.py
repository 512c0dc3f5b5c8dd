"""Residual blocks both UNets and both VAEs use (diffusers' ``resnet.py``), in export-safe layers.

One class per diffusers class: each is built with or without a time embedding (``temb_channels``), as its diffusers
counterpart is, and only the configurations the published models use are built (SiLU, GroupNorm). Attribute paths
equal diffusers' module paths, so parameter names equal the checkpoint keys.
"""

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from .layers import Conv2d, GroupNorm, Linear, TemporalConv3d, clips_to_frames, frames_to_clips, silu


class _LearnedAlpha(nn.Cell):
    """The learned blend factor of diffusers' ``AlphaBlender``: ``alpha = sigmoid(mix_factor)``."""

    def __init__(self, alpha):
        super().__init__()
        self.mix_factor = Parameter(initializer(alpha, (1,), ms.float32), name="mix_factor")

    def alpha(self, dtype):
        return ops.sigmoid(self.mix_factor).astype(dtype)


class SpatialAlphaBlender(_LearnedAlpha):
    """``alpha * x_spatial + (1 - alpha) * x_temporal``: alpha weights the spatial branch.

    diffusers' ``AlphaBlender(merge_strategy="learned_with_images")`` for an all-zeros ``image_only_indicator`` (the
    SVD UNet: its pipeline always passes zeros, so the indicator is not an input here).
    """

    def construct(self, x_spatial, x_temporal):
        alpha = self.alpha(x_spatial.dtype)
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class TemporalAlphaBlender(_LearnedAlpha):
    """``alpha * x_temporal + (1 - alpha) * x_spatial``: alpha weights the temporal branch.

    diffusers' ``AlphaBlender(merge_strategy="learned", switch_spatial_to_temporal_mix=True)`` (the SVD VAE decoder).
    """

    def construct(self, x_spatial, x_temporal):
        alpha = self.alpha(x_spatial.dtype)
        return alpha * x_temporal + (1.0 - alpha) * x_spatial


class ResnetBlock2D(nn.Cell):
    """diffusers' ``ResnetBlock2D`` (time_embedding_norm="default", SiLU) on [N, C, H, W].

    norm1 -> SiLU -> conv1 (+ ``time_emb_proj(silu(temb))`` per channel, when built with ``temb_channels``) -> norm2
    -> SiLU -> conv2, added to the input (through a 1x1 ``conv_shortcut`` when the channel count changes), the sum
    divided by ``output_scale_factor``.
    """

    def __init__(
        self, in_channels, out_channels=None, temb_channels=None, groups=32, eps=1e-6, output_scale_factor=1.0
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.out_channels = out_channels
        self.output_scale_factor = float(output_scale_factor)
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def construct(self, x, temb=None):
        """``temb`` [N, temb_channels], given exactly when the block was built with ``temb_channels``."""
        h = self.conv1(silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            t = self.time_emb_proj(silu(temb))
            h = h + t.reshape(t.shape[0], self.out_channels, 1, 1)
        h = self.conv2(silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class TemporalResnetBlock(nn.Cell):
    """diffusers' ``TemporalResnetBlock`` on [B, C, F, H, W] (same channels in and out): the ``ResnetBlock2D`` layout
    with Conv3d kernels (3, 1, 1) that mix neighbouring frames, 32 groups."""

    def __init__(self, channels, temb_channels=None, eps=1e-6):
        super().__init__()
        self.norm1 = GroupNorm(32, channels, eps=eps)
        self.conv1 = TemporalConv3d(channels, channels)
        self.time_emb_proj = Linear(temb_channels, channels) if temb_channels else None
        self.norm2 = GroupNorm(32, channels, eps=eps)
        self.conv2 = TemporalConv3d(channels, channels)

    def construct(self, x, temb=None):
        """``temb`` [B, F, temb_channels] (one per frame), given exactly when built with ``temb_channels``."""
        h = self.conv1(silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            b, c, f = x.shape[0], x.shape[1], x.shape[2]
            t = self.time_emb_proj(silu(temb))
            h = h + t.transpose(0, 2, 1).reshape(b, c, f, 1, 1)
        h = self.conv2(silu(self.norm2(h)))
        return x + h


class SpatioTemporalResBlock(nn.Cell):
    """diffusers' ``SpatioTemporalResBlock``: a per-frame ``ResnetBlock2D``, then a ``TemporalResnetBlock`` across the
    frames of each clip, blended by ``time_mixer``.

    The blend is a ``SpatialAlphaBlender`` (the UNet's) or, with ``switch_spatial_to_temporal_mix``, a
    ``TemporalAlphaBlender`` (the VAE decoder's), starting at ``merge_factor``. ``temporal_eps`` defaults to ``eps``.
    """

    def __init__(
        self, in_channels, out_channels, temb_channels=None, eps=1e-6, temporal_eps=None, merge_factor=0.5,
        switch_spatial_to_temporal_mix=False,
    ):
        super().__init__()
        temporal_eps = eps if temporal_eps is None else temporal_eps
        blender = TemporalAlphaBlender if switch_spatial_to_temporal_mix else SpatialAlphaBlender
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, temb_channels, eps=eps)
        self.temporal_res_block = TemporalResnetBlock(out_channels, temb_channels, eps=temporal_eps)
        self.time_mixer = blender(merge_factor)

    def construct(self, x, num_frames, temb=None):
        """``x`` [B*F, C, H, W] with F = ``num_frames``; ``temb`` [B*F, temb_channels] when built with one."""
        h = frames_to_clips(self.spatial_res_block(x, temb), num_frames)
        if temb is None:
            mixed = self.temporal_res_block(h)
        else:
            mixed = self.temporal_res_block(h, temb.reshape(h.shape[0], num_frames, -1))
        return clips_to_frames(self.time_mixer(h, mixed))
