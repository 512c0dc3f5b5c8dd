"""What the two video UNets (SVD's spatio-temporal, ModelScope's 3D) share: the channel plan of their blocks, the
block bases whose ``construct`` is the one per-layer loop of each block kind, and ``UNetModel``, whose ``_denoise`` is
the one down -> mid -> up traversal.

Activations are [batch * frames, C, H, W] as in diffusers; ``temb`` is one time embedding per frame, ``context`` the
cross-attention conditioning, ``num_frames`` a Python int taken from the static input shape. A block's own cells are
reached through two methods its UNet's layer mixin defines: ``_resnet(i, x, temb, num_frames)`` (the i-th resnet
stage) and ``_attend(i, x, context, num_frames)`` (the i-th transformer stage).
"""

import mindspore as ms
from mindspore import nn, ops

from .layers import Conv2d, GroupNorm, TimestepEmbedding, Timesteps, set_forward_chunking, silu
from .loading import config_from_dict


def down_block_channels(block_out_channels):
    """Per down block: ``in_channels`` (the previous block's output, the first block's own at the top),
    ``out_channels`` and ``add_downsample`` (every block but the last halves the size)."""
    n = len(block_out_channels)
    return [
        dict(in_channels=block_out_channels[max(i - 1, 0)], out_channels=c, add_downsample=i < n - 1)
        for i, c in enumerate(block_out_channels)
    ]


def up_block_channels(block_out_channels):
    """Per up block (bottom first): ``in_channels`` (the channels of its last skip connection, from the mirrored down
    block's input), ``prev_output_channel`` (the previous up block's output), ``out_channels`` and ``add_upsample``
    (every block but the last doubles the size)."""
    rev = list(reversed(block_out_channels))
    n = len(rev)
    return [
        dict(
            in_channels=rev[min(i + 1, n - 1)], prev_output_channel=rev[max(i - 1, 0)], out_channels=rev[i],
            add_upsample=i < n - 1,
        )
        for i in range(n)
    ]


def down_resnet_in_channels(in_channels, out_channels, num_layers):
    """Input channels of a down block's resnets: the first changes the channel count, the rest keep it."""
    return [in_channels] + [out_channels] * (num_layers - 1)


def up_resnet_in_channels(in_channels, prev_output_channel, out_channels, num_layers):
    """Input channels of an up block's resnets: the running activation (``prev_output_channel`` into the first,
    ``out_channels`` after) concatenated with one skip connection (``out_channels``; ``in_channels`` for the last)."""
    channels = []
    for i in range(num_layers):
        skip_channels = in_channels if i == num_layers - 1 else out_channels
        running_channels = prev_output_channel if i == 0 else out_channels
        channels.append(running_channels + skip_channels)
    return channels


class UNetBlock(nn.Cell):
    """One layer of a block is ``_resnet(i)``, then ``_attend(i)`` where the block has cross-attention."""

    has_cross_attention = False

    def _layer(self, i, x, temb, context, num_frames):
        x = self._resnet(i, x, temb, num_frames)
        if self.has_cross_attention:
            x = self._attend(i, x, context, num_frames)
        return x


class UNetDownBlock(UNetBlock):
    """``num_layers`` layers, then the optional ``downsamplers[0]``: its stages. Returns the output and every stage's
    output (the skip connections, in order)."""

    def stage_count(self):
        return self.num_layers + (0 if self.downsamplers is None else 1)

    def stage(self, i, x, temb, context, num_frames):
        """Stage ``i``: layer ``i``, or the downsampler after the last layer."""
        if i < self.num_layers:
            return self._layer(i, x, temb, context, num_frames)
        return self.downsamplers[0](x)

    def construct(self, x, temb, context, num_frames):
        states = ()
        for i in range(self.stage_count()):
            x = self.stage(i, x, temb, context, num_frames)
            states = states + (x,)
        return x, states


class UNetUpBlock(UNetBlock):
    """``num_layers`` layers, each fed the running activation concatenated (on channels) with one skip connection,
    last first, then the optional ``upsamplers[0]``.

    ``skips`` holds this block's ``num_layers`` skip connections in the order the down path produced them.
    """

    def construct(self, x, skips, temb, context, num_frames):
        for i in range(self.num_layers):
            x = self.up_layer(i, x, skips[self.num_layers - 1 - i], temb, context, num_frames)
        return self.finish(x)

    def up_layer(self, i, x, skip, temb, context, num_frames):
        """Layer ``i`` on the running activation ``x`` concatenated with its skip connection."""
        return self._layer(i, ops.concat((x, skip), 1), temb, context, num_frames)

    def finish(self, x):
        """The optional upsampler after the last layer."""
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock(UNetBlock):
    """``_resnet(0)``, then ``_attend(i)`` and ``_resnet(i + 1)`` for each of ``num_layers`` layers."""

    def construct(self, x, temb, context, num_frames):
        x = self._resnet(0, x, temb, num_frames)
        for i in range(self.num_layers):
            x = self._attend(i, x, context, num_frames)
            x = self._resnet(i + 1, x, temb, num_frames)
        return x


def repeat_per_frame(x, num_frames):
    """[B, ...] -> [B*F, ...]: each video's entry once per frame (diffusers' ``repeat_interleave``)."""
    b, rest = x.shape[0], x.shape[1:]
    return ops.broadcast_to(x.reshape((b, 1) + rest), (b, num_frames) + rest).reshape((b * num_frames,) + rest)


class UNetModel(nn.Cell):
    """The parts both UNets share: ``conv_in`` and the time embedding, the down -> mid -> up traversal, the output
    layers, ``from_config`` (of the subclass's ``config_class``) and forward chunking.

    ``forward_chunk_size`` (or ``enable_forward_chunking``) runs every transformer feed-forward over slices of that
    many positions along axis 1 (diffusers' ``enable_forward_chunking(chunk_size, dim=1)``): spatial positions in
    the spatial transformers, frames in the temporal ones. Lower peak memory, identical result.
    """

    config_class = None

    def __init__(self, config):
        """Check ``config`` (its ``validate``) and keep it as ``self.config``."""
        super().__init__()
        config.validate()
        self.config = config

    @classmethod
    def from_config(cls, config_dict, forward_chunk_size=None):
        return cls(config_from_dict(cls.config_class, config_dict), forward_chunk_size)

    def enable_forward_chunking(self, chunk_size=None):
        """Chunk every transformer feed-forward along axis 1 (``None`` turns chunking off); see
        :func:`~framegraph.models.layers.set_forward_chunking`."""
        set_forward_chunking(self, chunk_size)

    def _build_input(self, in_channels, channels):
        """``conv_in`` to ``channels`` and the sinusoidal time embedding (``time_proj`` -> ``time_embedding``) of
        width ``4 * channels``, which it returns."""
        temb_dim = channels * 4
        self.conv_in = Conv2d(in_channels, channels, 3, padding=1)
        self.time_proj = Timesteps(channels, True, 0)
        self.time_embedding = TimestepEmbedding(channels, temb_dim)
        return temb_dim

    def _build_output(self, channels, out_channels, groups, eps, forward_chunk_size):
        """``conv_norm_out`` -> SiLU -> ``conv_out``, and the forward chunking of every block (built last)."""
        self.num_upsamplers = len(self.up_blocks) - 1
        self.conv_norm_out = GroupNorm(groups, channels, eps=eps)
        self.conv_out = Conv2d(channels, out_channels, 3, padding=1)
        self.forward_chunk_size = None
        self.enable_forward_chunking(forward_chunk_size)

    def _check_sample_size(self, height, width, what):
        """Raise ValueError unless ``height`` and ``width`` are multiples of 2 ** (number of up-samplers), since the
        UNet halves them that many times; ``what`` names the size the user chooses (e.g. "an image size")."""
        factor = 2**self.num_upsamplers
        if height % factor != 0 or width % factor != 0:
            raise ValueError(
                f"sample height and width ({height}, {width}) must be multiples of {factor}, since the UNet halves "
                f"them {self.num_upsamplers} times; use {what} whose latents are multiples of {factor}"
            )

    def _time_embedding(self, timestep, batch, dtype):
        """The [batch, D] embedding of ``timestep`` ([] or [batch], any number type), in ``dtype``."""
        timesteps = ops.broadcast_to(timestep.astype(ms.float32).reshape(-1), (batch,))
        return self.time_embedding(self.time_proj(timesteps).astype(dtype))

    def _denoise(self, x, temb, context, num_frames):
        """The UNet from the output of ``conv_in`` (and whatever the subclass runs right after it) to that of
        ``conv_out``. ``x`` is the first skip connection and each down block appends its stage outputs; the mid block
        runs at the bottom; each up block takes back as many skip connections as it has layers, from the end."""
        skips = (x,)
        for block in self.down_blocks:
            x, states = block(x, temb, context, num_frames)
            skips = skips + states
        x = self.mid_block(x, temb, context, num_frames)
        for block in self.up_blocks:
            count = block.num_layers
            x = block(x, skips[len(skips) - count :], temb, context, num_frames)
            skips = skips[: len(skips) - count]
        return self._output(x)

    def _output(self, x):
        return self.conv_out(silu(self.conv_norm_out(x)))

    # -- step caching (DeepCache) ----------------------------------------------------------------------------------
    # The up path is a list of layers, the last one first fed the first skip connection (conv_in's output). A cache
    # branch ``b`` splits the UNet at the (b+1)-th layer from the end of that list: the *deep* pass is the whole UNet
    # and also returns the activation entering that layer (the cached feature); the *shallow* pass runs conv_in, the
    # first ``b`` down stages (which make the skip connections those last b+1 layers take), and those layers, on the
    # cached feature instead of everything deeper. This is DeepCache's ``cache_branch_id`` (DeepCacheSDHelper) on
    # UNets of two layers per down block; see cache_split in unet_config.

    def _denoise_deep(self, x, temb, context, num_frames, cache_branch):
        """``_denoise`` that also returns the cached feature of ``cache_branch``: (output, feature)."""
        skips = (x,)
        for block in self.down_blocks:
            x, states = block(x, temb, context, num_frames)
            skips = skips + states
        x = self.mid_block(x, temb, context, num_frames)
        x, feature = self._up_layers(x, skips, temb, context, num_frames, self._entry_layer(cache_branch), True)
        return self._output(x), feature

    def _denoise_shallow(self, x, feature, temb, context, num_frames, cache_branch):
        """The shallow pass of ``cache_branch`` from conv_in's output ``x`` and the cached ``feature``."""
        skips = (x,)
        done = 0
        for block in self.down_blocks:
            for i in range(block.stage_count()):
                if done < cache_branch:
                    x = block.stage(i, x, temb, context, num_frames)
                    skips = skips + (x,)
                done = done + 1
        x = self._up_layers(feature, skips, temb, context, num_frames, self._entry_layer(cache_branch), False)
        return self._output(x)

    def _up_layer_count(self):
        total = 0
        for block in self.up_blocks:
            total = total + block.num_layers
        return total

    def _entry_layer(self, cache_branch):
        """The index (in the up path's layer list) of the layer the cached feature enters."""
        return self._up_layer_count() - 1 - cache_branch

    def _up_layers(self, x, skips, temb, context, num_frames, first, record):
        """The up path from layer ``first`` on (``x`` enters it); layer k takes skip connection ``total - 1 - k``
        (``skips`` holds at least those). With ``record`` every layer runs and the activation entering layer
        ``first`` comes back too: (output, feature)."""
        total = self._up_layer_count()
        feature = x
        k = 0
        for block in self.up_blocks:
            ran = False
            for i in range(block.num_layers):
                if k == first and record:
                    feature = x
                if k >= first or record:
                    x = block.up_layer(i, x, skips[total - 1 - k], temb, context, num_frames)
                    ran = True
                k = k + 1
            if ran:
                x = block.finish(x)
        if record:
            return x, feature
        return x


class UNetDeepGraph(nn.Cell):
    """The graph of a cache branch's deep pass: the UNet's inputs -> (noise_pred, deep_features)."""

    def __init__(self, unet, cache_branch):
        super().__init__(auto_prefix=False)  # the UNet's parameter names stay the checkpoint's
        self.unet = unet
        self.cache_branch = int(cache_branch)

    def construct(self, *inputs):
        x, temb, context, layout = self.unet.prepare(*inputs)
        x, feature = self.unet._denoise_deep(x, temb, context, layout[1], self.cache_branch)
        return self.unet.finish(x, layout), feature


class UNetShallowGraph(nn.Cell):
    """The graph of a cache branch's shallow pass: the UNet's inputs and deep_features -> noise_pred."""

    def __init__(self, unet, cache_branch):
        super().__init__(auto_prefix=False)
        self.unet = unet
        self.cache_branch = int(cache_branch)

    def construct(self, *inputs):
        x, temb, context, layout = self.unet.prepare(*inputs[:-1])
        x = self.unet._denoise_shallow(x, inputs[-1], temb, context, layout[1], self.cache_branch)
        return self.unet.finish(x, layout)
