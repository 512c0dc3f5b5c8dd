"""Export-safe MindSpore layers.

Every construct the models use lives here, in a form that (a) computes what diffusers/transformers compute and
(b) survives MindSpore's ONNX exporter, which today rejects GroupNorm and Erf, misplaces Conv3d padding and rejects
ResizeNearestNeighborV2 (see the project notes). ``tests/test_layers.py`` exports each layer to ONNX and compares
onnxruntime's output with MindSpore's.

Parameter attribute names equal the PyTorch ones (``weight``/``bias``), so checkpoint keys map 1:1.
"""

import contextlib
import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, Zero, initializer

# Abramowitz & Stegun 7.1.26: |erf(x) - approximation| <= 1.5e-7 for all x.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


# Whether Conv2d and TemporalConv3d compute their convolutions as one matrix product over patches (see
# ``convolutions_as_matmul``); read when a cell runs, so only op-by-op (PyNative) runs see a change.
_CONVOLUTIONS = {"as_matmul": False}


@contextlib.contextmanager
def convolutions_as_matmul():
    """Within this context, op-by-op (PyNative) runs of Conv2d and TemporalConv3d compute each convolution as
    gathered patches times the weight laid out as a (taps x channels, out_channels) matrix: the same sums in another
    order, on MindSpore's CPU matrix product instead of its convolution kernel, which is far slower at real sizes
    (measured in docs/export.md). Graphs compiled or exported inside it are not affected by design: only the
    export check's reference run uses it (``framegraph.export.check.run_reference``)."""
    before = _CONVOLUTIONS["as_matmul"]
    _CONVOLUTIONS["as_matmul"] = True
    try:
        yield
    finally:
        _CONVOLUTIONS["as_matmul"] = before


def conv_as_matmul(x, weight, stride, pad):
    """The 2-D convolution of [N, C, H, W] ``x`` by [O, C, kh, kw] ``weight`` (no bias) with ``stride`` (sh, sw)
    and zero ``pad`` (top, bottom, left, right), as one matrix product over its patches."""
    n, c, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    (sh, sw), (top, bottom, left, right) = stride, pad
    ho, wo = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
    x = ops.pad(x, (left, right, top, bottom)).transpose(0, 2, 3, 1)  # NHWC: a patch row is contiguous channels
    taps = [x[:, dy:dy + sh * (ho - 1) + 1:sh, dx:dx + sw * (wo - 1) + 1:sw, :]
            for dy in range(kh) for dx in range(kw)]
    patches = (ops.concat(taps, -1) if len(taps) > 1 else taps[0]).reshape(n * ho * wo, kh * kw * c)
    matrix = weight.transpose(2, 3, 1, 0).reshape(kh * kw * c, out_channels)
    return ops.matmul(patches, matrix).reshape(n, ho, wo, out_channels).transpose(0, 3, 1, 2)


def _param(shape, init, name):
    return Parameter(initializer(init, shape, ms.float32), name=name)


def _erf_abs(a):
    """erf(a) for a >= 0 from exp/mul/div only (ONNX-exportable), accurate to 1.5e-7 absolute."""
    # a 0-d numerator of a's dtype: ones_like would be folded into a full-size constant, and a Python float is
    # exported as a float32 constant that turns a float16 graph's Div (and all after it) into float32
    t = ops.div(ops.scalar_to_tensor(1.0, a.dtype), 1.0 + _ERF_P * a)
    poly = t * (_ERF_A[0] + t * (_ERF_A[1] + t * (_ERF_A[2] + t * (_ERF_A[3] + t * _ERF_A[4]))))
    return 1.0 - poly * ops.exp(-a * a)


def gelu(x):
    """The exact (erf) GELU that the published models use, in export-safe ops.

    0.5 * x * (1 + erf(x / sqrt 2)) = 0.5 * x + 0.5 * |x| * erf(|x| / sqrt 2), since erf is odd.
    """
    a = ops.abs(x)
    return 0.5 * x + 0.5 * a * _erf_abs(a * (1.0 / math.sqrt(2.0)))


def quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)


def silu(x):
    return x * ops.sigmoid(x)


class Linear(nn.Cell):
    """``torch.nn.Linear``: weight [out, in], bias [out]; applies to the last axis of any rank."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param((out_features, in_features), Normal(0.02), "weight")
        self.bias = _param((out_features,), Zero(), "bias") if bias else None
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        shape = x.shape
        y = self.matmul(x.reshape(-1, self.in_features), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(shape[:-1] + (self.out_features,))


class Conv2d(nn.Cell):
    """``torch.nn.Conv2d``; ``padding`` is an int or MindSpore's (top, bottom, left, right) zero padding.

    MindSpore's ONNX exporter writes Conv pads in that order, while ONNX reads (top, left, bottom, right): the
    export post-pass (``framegraph.export.onnx_graph.fix_conv_pads``) reorders them, so asymmetric padding is safe.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = _param((out_channels, in_channels, kernel_size, kernel_size), Normal(0.02), "weight")
        self.bias = _param((out_channels,), Zero(), "bias") if bias else None
        pad = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,) * 4
        pad_mode = "pad" if any(pad) else "valid"
        self.stride, self.pad = (stride, stride), pad
        self.conv = ops.Conv2D(
            out_channels, (kernel_size, kernel_size), pad_mode=pad_mode, pad=pad, stride=(stride, stride)
        )
        self.bias_add = ops.BiasAdd()

    def construct(self, x):
        if _CONVOLUTIONS["as_matmul"]:
            y = conv_as_matmul(x, self.weight, self.stride, self.pad)
        else:
            y = self.conv(x, self.weight)
        if self.bias is not None:
            y = self.bias_add(y, self.bias)
        return y


class TemporalConv3d(nn.Cell):
    """``torch.nn.Conv3d(in, out, kernel_size=(3, 1, 1), padding=(1, 0, 0))`` on [B, C, F, H, W].

    Computed as a (3, 1) 2-D convolution over [B, C, F, H*W] padded by one frame at both ends, because
    MindSpore's ONNX exporter misplaces Conv3d padding (2-D pads are reordered by the export post-pass; see
    ``Conv2d``). The weight keeps the checkpoint's 5-D shape.
    """

    def __init__(self, in_channels, out_channels, bias=True):
        super().__init__()
        self.out_channels = out_channels
        self.weight = _param((out_channels, in_channels, 3, 1, 1), Normal(0.02), "weight")
        self.bias = _param((out_channels,), Zero(), "bias") if bias else None
        self.conv = ops.Conv2D(out_channels, (3, 1), pad_mode="pad", pad=(1, 1, 0, 0))
        self.bias_add = ops.BiasAdd()

    def construct(self, x):
        b, c, f, h, w = x.shape
        x = x.reshape(b, c, f, h * w)
        weight = self.weight.reshape(self.out_channels, c, 3, 1)
        if _CONVOLUTIONS["as_matmul"]:
            y = conv_as_matmul(x, weight, (1, 1), (1, 1, 0, 0))
        else:
            y = self.conv(x, weight)
        if self.bias is not None:
            y = self.bias_add(y, self.bias)
        return y.reshape(b, self.out_channels, f, h, w)


def _scale_and_shift(channels):
    """The affine parameters of a normalisation: ``weight`` (ones) and ``bias`` (zeros), one per channel."""
    return _param((channels,), "ones", "weight"), _param((channels,), "zeros", "bias")


def _standardise(h, axis, eps):
    """``(h - mean) / sqrt(var + eps)`` over ``axis`` (biased variance, as torch's norms)."""
    mean = h.mean(axis=axis, keep_dims=True)
    centred = h - mean
    var = (centred * centred).mean(axis=axis, keep_dims=True)
    return centred / ops.sqrt(var + eps)


class GroupNorm(nn.Cell):
    """``torch.nn.GroupNorm`` on [N, C, *] as reshape + mean + variance (computed in float32)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        super().__init__()
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight, self.bias = _scale_and_shift(num_channels)

    def construct(self, x):
        shape = x.shape
        dtype = x.dtype
        h = x.astype(ms.float32).reshape(shape[0], self.num_groups, -1)
        h = _standardise(h, 2, self.eps).reshape(shape).astype(dtype)
        if self.affine:
            param_shape = (1, self.num_channels) + (1,) * (len(shape) - 2)
            h = h * self.weight.reshape(param_shape) + self.bias.reshape(param_shape)
        return h


class LayerNorm(nn.Cell):
    """``torch.nn.LayerNorm`` over the last axis (computed in float32)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight, self.bias = _scale_and_shift(normalized_shape)

    def construct(self, x):
        dtype = x.dtype
        h = _standardise(x.astype(ms.float32), -1, self.eps).astype(dtype)
        if self.elementwise_affine:
            h = h * self.weight + self.bias
        return h


class Upsample2x(nn.Cell):
    """Nearest-neighbour 2x upsampling of [N, C, H, W] (``F.interpolate(scale_factor=2, mode="nearest")``)."""

    def construct(self, x):
        h, w = x.shape[-2:]
        return ops.ResizeNearestNeighbor((h * 2, w * 2))(x)


def in_turn(cells, x):
    """``x`` through each of ``cells`` in order (the plain chain of a block list)."""
    for cell in cells:
        x = cell(x)
    return x


def frames_to_clips(x, num_frames):
    """[B*F, C, H, W] frames -> [B, C, F, H, W] clips of ``num_frames`` frames (what the temporal layers take)."""
    bf, c, h, w = x.shape
    return x.reshape(bf // num_frames, num_frames, c, h, w).transpose(0, 2, 1, 3, 4)


def clips_to_frames(x):
    """[B, C, F, H, W] clips -> [B*F, C, H, W] frames (what the per-frame 2-D layers take)."""
    b, c, f, h, w = x.shape
    return x.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def softmax(x):
    """Softmax over the last axis, computed in float32."""
    return ops.softmax(x.astype(ms.float32), -1).astype(x.dtype)


SCORE_BYTES = 4  # attention scores and their softmax are float32 (see ``softmax``)


def query_slice(scores_per_query, queries, max_scores_mb=None):
    """How many queries one slice of attention takes so that its float32 scores (``scores_per_query`` per query:
    batch x heads x keys) stay within ``max_scores_mb`` MB; all of them without a limit, at least one."""
    if max_scores_mb is None:
        return queries
    return max(1, min(queries, int(max_scores_mb * 2 ** 20 // (scores_per_query * SCORE_BYTES))))


def over_slices(fn, x, axis, size, *args):
    """``fn(x, *args)``, computed over consecutive slices of ``size`` along ``axis`` of ``x`` and concatenated there
    (a last slice shorter than ``size`` is allowed); ``fn`` runs once on the whole ``x`` where ``size`` is None or
    covers the axis. For functions that act on each position along ``axis`` independently: the result is the same."""
    length = x.shape[axis]
    if size is None or size >= length:
        return fn(x, *args)
    parts = ()
    for start in range(0, length, size):
        parts = parts + (fn(ops.narrow(x, axis, start, min(size, length - start)), *args),)
    return ops.concat(parts, axis)


def _attend(q, k, v):
    return ops.matmul(softmax(ops.matmul(q, k)), v)


def attention(q, k, v, heads, max_scores_mb=None):
    """Scaled dot-product attention of [B, Lq, heads*d] queries over [B, Lk, heads*d] keys/values.

    With ``max_scores_mb`` the queries are taken in slices (see ``query_slice``) so that no [B, heads, slice, Lk]
    score tensor is larger than that: each query's softmax still runs over every key, so the result is the same,
    and the graph never holds the whole [B, heads, Lq, Lk] scores (85 GB for SVD-XT's first level at 576x1024 and
    25 frames with guidance).
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    q = q.reshape(b, lq, heads, d).transpose(0, 2, 1, 3) * (1.0 / math.sqrt(d))
    k = k.reshape(b, lk, heads, d).transpose(0, 2, 3, 1)
    v = v.reshape(b, lk, heads, d).transpose(0, 2, 1, 3)
    out = over_slices(_attend, q, 2, query_slice(b * heads * lk, lq, max_scores_mb), k, v)
    return out.transpose(0, 2, 1, 3).reshape(b, lq, inner)


class Timesteps(nn.Cell):
    """diffusers' sinusoidal ``Timesteps`` projection of a [N] vector into [N, num_channels]."""

    def __init__(self, num_channels, flip_sin_to_cos=True, downscale_freq_shift=0.0, max_period=10000):
        super().__init__()
        half = num_channels // 2
        exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / (half - downscale_freq_shift)
        self.freqs = Tensor(np.exp(exponent).astype(np.float32)[None, :])
        self.flip_sin_to_cos = flip_sin_to_cos
        self.pad = num_channels % 2 == 1

    def construct(self, t):
        args = t.astype(ms.float32).reshape(-1, 1) * self.freqs
        if self.flip_sin_to_cos:
            emb = ops.concat((ops.cos(args), ops.sin(args)), -1)
        else:
            emb = ops.concat((ops.sin(args), ops.cos(args)), -1)
        if self.pad:
            emb = ops.concat((emb, ops.zeros((emb.shape[0], 1), emb.dtype)), -1)
        return emb


class TimestepEmbedding(nn.Cell):
    """diffusers' ``TimestepEmbedding``: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels, time_embed_dim, out_dim=None):
        super().__init__()
        self.linear_1 = Linear(in_channels, time_embed_dim)
        self.linear_2 = Linear(time_embed_dim, out_dim or time_embed_dim)

    def construct(self, x):
        return self.linear_2(silu(self.linear_1(x)))


def set_attention_slicing(net, max_scores_mb=None):
    """Run every attention of ``net`` (cells with a ``max_scores_mb`` attribute) over slices of its queries whose
    float32 scores stay within ``max_scores_mb`` MB (see ``attention``); ``None`` computes each attention whole.
    Call before the first run or export: a compiled graph keeps the setting it was compiled with."""
    if max_scores_mb is not None and (isinstance(max_scores_mb, bool) or not max_scores_mb > 0):
        raise ValueError(f"max_scores_mb={max_scores_mb!r} must be a positive number of MB or None")
    for _, cell in net.cells_and_names():
        if hasattr(cell, "max_scores_mb"):
            cell.max_scores_mb = max_scores_mb


def set_forward_chunking(net, chunk_size=None):
    """Run every feed-forward of ``net`` (cells with a ``chunk_size`` attribute) over slices of ``chunk_size``
    positions; ``None`` turns chunking off. Call before the first run or export: a compiled graph keeps the
    setting it was compiled with."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"forward_chunk_size={chunk_size!r} must be a positive int or None")
    net.forward_chunk_size = chunk_size
    for _, cell in net.cells_and_names():
        if hasattr(cell, "chunk_size"):
            cell.chunk_size = chunk_size
