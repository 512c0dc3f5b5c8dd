"""Each export-safe layer: (a) computes what PyTorch computes (numpy references of the torch definitions) and
(b) exports through MindSpore's ONNX exporter with onnxruntime's output equal to MindSpore's."""

import math

import numpy as np
import pytest

from helpers import onnx_roundtrip

RNG = np.random.default_rng(0)


def _erf(x):
    return np.vectorize(math.erf)(x)


def _ref_group_norm(x, groups, w, b, eps):
    n, c = x.shape[:2]
    h = x.reshape(n, groups, -1).astype(np.float64)
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return h.reshape(x.shape) * w.reshape(shape) + b.reshape(shape)


def _ref_layer_norm(x, w, b, eps):
    x = x.astype(np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def _ref_conv2d(x, w, b, stride, pad):
    """torch's conv2d after zero padding; ``pad`` is an int or (top, bottom, left, right)."""
    top, bottom, left, right = pad if isinstance(pad, tuple) else (pad,) * 4
    o, _, k, _ = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right))).astype(np.float64)
    n, c, h, wd = x.shape
    oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + b.reshape(1, o, 1, 1)


def _ref_temporal_conv(x, w, b):
    # torch Conv3d(kernel (3,1,1), padding (1,0,0)) on [B, C, F, H, W]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0), (0, 0))).astype(np.float64)
    f = x.shape[2]
    out = sum(np.einsum("bcfhw,oc->bofhw", xp[:, :, k:k + f], w[:, :, k, 0, 0]) for k in range(3))
    return out + b.reshape(1, -1, 1, 1, 1)


def _ref_timesteps(t, dim):
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    return np.concatenate([np.cos(args), np.sin(args)], -1)


def _set_params(net, ms):
    params = {}
    for name, p in net.parameters_and_names():
        value = RNG.standard_normal(p.shape).astype(np.float32)
        p.set_data(ms.Tensor(value))
        params[name] = value
    return params


def _cases(ms, layers):
    from mindspore import nn

    class Fn(nn.Cell):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def construct(self, x):
            return self.fn(x)

    class Attn(nn.Cell):
        def construct(self, x):
            return layers.attention(x, x * 0.5, x * 2.0, 2)

    def ref_attention(x, p):
        b, l, d = x.shape
        q, k, v = [y.reshape(b, l, 2, d // 2).transpose(0, 2, 1, 3).astype(np.float64) for y in (x, x * 0.5, x * 2)]
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // 2)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        return (s @ v).transpose(0, 2, 1, 3).reshape(b, l, d)

    return {
        "gelu": (Fn(layers.gelu), (2, 5, 7), lambda x, p: 0.5 * x * (1 + _erf(x / math.sqrt(2)))),
        "quick_gelu": (Fn(layers.quick_gelu), (2, 5, 7), lambda x, p: x / (1 + np.exp(-1.702 * x))),
        "silu": (Fn(layers.silu), (2, 5, 7), lambda x, p: x / (1 + np.exp(-x))),
        "group_norm": (layers.GroupNorm(4, 8, 1e-6), (2, 8, 3, 5),
                       lambda x, p: _ref_group_norm(x, 4, p["weight"], p["bias"], 1e-6)),
        "group_norm_5d": (layers.GroupNorm(2, 8, 1e-5), (2, 8, 3, 5, 4),
                          lambda x, p: _ref_group_norm(x, 2, p["weight"], p["bias"], 1e-5)),
        "layer_norm": (layers.LayerNorm(8), (2, 3, 8), lambda x, p: _ref_layer_norm(x, p["weight"], p["bias"], 1e-5)),
        "linear": (layers.Linear(8, 6), (2, 3, 8), lambda x, p: x @ p["weight"].T + p["bias"]),
        "conv2d": (layers.Conv2d(4, 6, 3, padding=1), (2, 4, 8, 8),
                   lambda x, p: _ref_conv2d(x, p["weight"], p["bias"], 1, 1)),
        "conv2d_stride2": (layers.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 8, 8),
                           lambda x, p: _ref_conv2d(x, p["weight"], p["bias"], 2, 1)),
        "temporal_conv3d": (layers.TemporalConv3d(4, 6), (2, 4, 5, 3, 2),
                            lambda x, p: _ref_temporal_conv(x, p["weight"], p["bias"])),
        "upsample2x": (layers.Upsample2x(), (2, 3, 4, 5), lambda x, p: x.repeat(2, axis=2).repeat(2, axis=3)),
        # F.pad(x, (0, 1, 0, 1)) then a stride-2 conv: the VAE encoder's downsampler
        "conv2d_pad_right_bottom": (layers.Conv2d(4, 6, 3, stride=2, padding=(0, 1, 0, 1)), (2, 4, 8, 9),
                                    lambda x, p: _ref_conv2d(x, p["weight"], p["bias"], 2, (0, 1, 0, 1))),
        "timesteps": (layers.Timesteps(8), (3,), lambda x, p: _ref_timesteps(x.astype(np.float64), 8)),
        "attention": (Attn(), (2, 6, 8), ref_attention),
    }


CASE_NAMES = ["gelu", "quick_gelu", "silu", "group_norm", "group_norm_5d", "layer_norm", "linear", "conv2d",
              "conv2d_stride2", "temporal_conv3d", "upsample2x", "conv2d_pad_right_bottom", "timesteps", "attention"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_layer_equals_torch_definition_and_exports_to_onnx(ms, case, tmp_path):
    from framegraph.models import layers

    net, shape, reference = _cases(ms, layers)[case]
    params = _set_params(net, ms)
    x = (RNG.standard_normal(shape) * 3).astype(np.float32)
    out = net(ms.Tensor(x)).asnumpy()
    ref = reference(x, params)
    scale = max(1.0, float(np.abs(ref).max()))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 2e-6 * scale, f"{case}: MindSpore vs reference"
    (onnx_out,), path = onnx_roundtrip(net, [x], tmp_path / f"{case}.onnx")
    assert onnx_out.shape == out.shape
    assert np.abs(onnx_out - out).max() <= 2e-6 * scale, f"{case}: onnxruntime vs MindSpore"


@pytest.mark.parametrize("case", ["conv2d", "conv2d_stride2", "temporal_conv3d", "conv2d_pad_right_bottom"])
def test_the_export_checks_reference_computes_convolutions_as_patch_products(ms, case, monkeypatch):
    """The export check's reference run (PyNative, convolutions as patch matrix products) equals the torch
    definition, and leaves the cell on MindSpore's convolution kernel afterwards."""
    from framegraph.export.check import run_reference
    from framegraph.models import layers

    calls = []
    patch_products = layers.conv_as_matmul
    monkeypatch.setattr(layers, "conv_as_matmul", lambda *a: calls.append(1) or patch_products(*a))
    net, shape, reference = _cases(ms, layers)[case]
    params = _set_params(net, ms)
    x = (RNG.standard_normal(shape) * 3).astype(np.float32)
    (out,) = run_reference(net, [x])
    ref = reference(x, params)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 2e-6 * max(1.0, float(np.abs(ref).max()))
    assert calls, "the reference ran MindSpore's convolution kernel"
    assert layers._CONVOLUTIONS["as_matmul"] is False


def test_gelu_is_exact_not_tanh(ms):
    from framegraph.models import layers

    x = np.linspace(-8, 8, 20001).astype(np.float32)
    out = layers.gelu(ms.Tensor(x)).asnumpy().astype(np.float64)
    exact = 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert np.abs(out - exact).max() < 1e-6
    assert np.abs(tanh - exact).max() > 1e-4  # the tanh form would fail the bound above


def test_single_key_attention_equals_full_attention(ms):
    """A softmax over one key is exactly 1, so ``Attention.single_key`` is the full attention of every query."""
    from framegraph.models.attention import Attention

    attn = Attention(16, heads=2, dim_head=8, cross_attention_dim=12)
    x = ms.Tensor(RNG.standard_normal((3, 5, 16)).astype(np.float32))
    context = ms.Tensor(RNG.standard_normal((3, 1, 12)).astype(np.float32))
    full = attn(x, context).asnumpy()
    single = attn.single_key(context).asnumpy()
    assert single.shape == (3, 1, 16)
    np.testing.assert_allclose(full, np.broadcast_to(single, full.shape), rtol=1e-6, atol=1e-6)
    assert np.abs(full[:, 0] - full[:, 1]).max() < 1e-6 and np.abs(single).max() > 1e-3


def test_shared_context_attention_equals_attention_over_repeated_context(ms):
    """Keys and values projected once per video equal diffusers' per-frame copies of the context."""
    from framegraph.models.attention import Attention

    attn = Attention(16, heads=2, dim_head=8, cross_attention_dim=12)
    frames = 3
    x = RNG.standard_normal((2 * frames, 5, 16)).astype(np.float32)
    context = RNG.standard_normal((2, 7, 12)).astype(np.float32)
    repeated = np.repeat(context, frames, axis=0)  # diffusers' repeat_interleave over the frames
    full = attn(ms.Tensor(x), ms.Tensor(repeated)).asnumpy()
    shared = attn.shared_context(ms.Tensor(x), ms.Tensor(context)).asnumpy()
    np.testing.assert_allclose(shared, full, rtol=1e-5, atol=1e-6)
    assert np.abs(full[0] - full[frames]).max() > 1e-3  # the two videos' contexts differ


def _ref_attention(q, k, v, heads):
    b, lq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, lq, heads, d).transpose(0, 2, 1, 3).astype(np.float64)
    kh = k.reshape(b, -1, heads, d).transpose(0, 2, 1, 3).astype(np.float64)
    vh = v.reshape(b, -1, heads, d).transpose(0, 2, 1, 3).astype(np.float64)
    scores = qh @ kh.transpose(0, 1, 3, 2) / math.sqrt(d)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ vh).transpose(0, 2, 1, 3).reshape(b, lq, inner)


def test_query_slice_keeps_the_scores_within_the_budget():
    from framegraph.models.layers import query_slice

    per_query = 3 * 2 * 7  # batch x heads x keys
    assert query_slice(per_query, 10) == 10  # no limit: whole
    assert query_slice(per_query, 10, max_scores_mb=3 * per_query * 4 / 2 ** 20) == 3
    assert query_slice(per_query, 10, max_scores_mb=1.0) == 10  # the whole scores fit
    assert query_slice(per_query, 10, max_scores_mb=1e-9) == 1  # never fewer than one query


def _attention_cell(heads, max_scores_mb):
    """A cell running ``layers.attention`` with a score budget (MindSpore is imported by the ``ms`` fixture)."""
    from mindspore import nn

    from framegraph.models.layers import attention

    class Cell(nn.Cell):
        def construct(self, q, k, v):
            return attention(q, k, v, heads, max_scores_mb)

    return Cell()


def test_sliced_attention_equals_whole_attention_and_exports(ms, tmp_path):
    """Queries in slices of 3 (10 = 3 + 3 + 3 + 1) give what the whole attention gives, in PyNative and through the
    ONNX export (graph mode), where the slices are separate products."""
    import onnx

    q, k, v = (RNG.standard_normal(shape).astype(np.float32) for shape in ((3, 10, 16), (3, 7, 16), (3, 7, 16)))
    budget = 3 * (3 * 2 * 7) * 4 / 2 ** 20  # three queries' scores
    expected = _ref_attention(q, k, v, heads=2)
    whole = _attention_cell(2, None)(*map(ms.Tensor, (q, k, v))).asnumpy()
    sliced = _attention_cell(2, budget)(*map(ms.Tensor, (q, k, v))).asnumpy()
    np.testing.assert_allclose(whole, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(sliced, whole, rtol=0, atol=1e-6)
    (onnx_out,), path = onnx_roundtrip(_attention_cell(2, budget), [q, k, v], tmp_path / "sliced.onnx")
    np.testing.assert_allclose(onnx_out, expected, rtol=0, atol=1e-5)
    products = sum(n.op_type == "MatMul" for n in onnx.load(path).graph.node)
    assert products == 2 * 4  # scores and values, per slice


def test_set_attention_slicing_reaches_every_attention_and_refuses_bad_budgets(ms):
    from mindspore import nn

    from framegraph.models.layers import set_attention_slicing
    from framegraph.models.attention import Attention
    from framegraph.models.vae_blocks import AttentionBlock

    net = nn.CellList([Attention(16, heads=2, dim_head=8), nn.CellList([AttentionBlock(32, groups=4)])])
    set_attention_slicing(net, 64)
    assert net[0].max_scores_mb == 64 and net[1][0].max_scores_mb == 64
    set_attention_slicing(net, None)
    assert net[0].max_scores_mb is None and net[1][0].max_scores_mb is None
    for bad in (0, -1.0, True, float("nan")):
        with pytest.raises(ValueError, match="max_scores_mb"):
            set_attention_slicing(net, bad)
