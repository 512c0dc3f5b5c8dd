"""Attention and transformer cells both UNets use (diffusers' ``attention_processor.py`` / ``attention.py``), in
export-safe layers: ``Attention``, the GEGLU ``FeedForward`` and the spatial ``BasicTransformerBlock``.

Attribute paths equal diffusers' module paths, so parameter names equal the checkpoint keys. Dropout is
inference-time identity (an ``nn.Identity`` where it holds a checkpoint index).
"""

from mindspore import nn, ops

from .layers import LayerNorm, Linear, attention, gelu, over_slices


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
        self._build_input(dim)
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def _build_input(self, dim):
        """The cells a subclass runs before ``norm1`` (none here); built first, as diffusers orders them."""

    def construct(self, x, context):
        """``x`` [N, L, C]; ``context`` [N, Lc, D], or [B, Lc, D] shared by the N // B frames of each video."""
        h = self.norm1(x)
        x = self.attn1(h, h) + x
        x = self.attn2.add_to(x, context, self.norm2)
        return feed_forward(self.ff, self.norm3(x), self.chunk_size) + x

