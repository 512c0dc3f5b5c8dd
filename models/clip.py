"""CLIP encoders in transformers' layout: ``CLIPVisionModelWithProjection`` (SVD's ``image_encoder``) and
``CLIPTextModel`` (text-to-video's ``text_encoder``).

Both share one pre-LayerNorm transformer (``CLIPEncoder``); the text encoder adds a causal mask. Attribute paths equal
the checkpoint keys that transformers 5 writes: ``vision_model.*`` / ``visual_projection.weight`` for the vision model,
and ``embeddings.*`` / ``encoder.*`` / ``final_layer_norm.*`` for the text model. Checkpoints saved by transformers 4
prefix the text keys with ``text_model.`` and some carry the ``position_ids`` buffer; ``convert_state_dict`` maps such
files onto these keys (checking the buffer instead of dropping it blindly).
"""

import dataclasses
import logging
import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from framegraph.models.layers import Conv2d, LayerNorm, Linear, gelu, quick_gelu, softmax
from framegraph.models.loading import config_from_dict

logger = logging.getLogger(__name__)

ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}
MASK_VALUE = -1e9  # added to masked (future) scores in float32; exp() of it is exactly 0


@dataclasses.dataclass
class CLIPVisionConfig:
    """transformers' ``CLIPVisionConfig`` fields that shape the model, with its defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass
class CLIPTextConfig:
    """transformers' ``CLIPTextConfig`` fields that shape the model, with its defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407


def _activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _causal_mask(length):
    """[1, 1, L, L] float32: 0 on and below the diagonal, MASK_VALUE above (a token sees itself and the past)."""
    future = np.triu(np.ones((length, length), dtype=bool), k=1)
    return Tensor(np.where(future, MASK_VALUE, 0.0).astype(np.float32)[None, None])


class Embedding(nn.Cell):
    """``torch.nn.Embedding``: a [num_embeddings, dim] table looked up with integer ids (ONNX ``Gather``)."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        self.weight = Parameter(initializer(Normal(0.02), (num_embeddings, embedding_dim), ms.float32), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class CLIPAttention(nn.Cell):
    """Multi-head self-attention with q/k/v/out projections; ``causal`` masks attention to later tokens."""

    def __init__(self, config, causal=False, max_length=None):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.causal = causal
        self.mask = _causal_mask(max_length) if causal else None
        dim = config.hidden_size
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.q_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def construct(self, hidden_states):
        b, length, dim = hidden_states.shape
        q = self.q_proj(hidden_states).reshape(b, length, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(hidden_states).reshape(b, length, self.heads, self.head_dim).transpose(0, 2, 3, 1)
        v = self.v_proj(hidden_states).reshape(b, length, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        scores = ops.matmul(q * self.scale, k)
        if self.causal:
            scores = scores.astype(ms.float32) + self.mask[:, :, :length, :length]
        probs = softmax(scores).astype(v.dtype)
        out = ops.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, length, dim)
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.act = _activation(config.hidden_act)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def construct(self, hidden_states):
        return self.fc2(self.act(self.fc1(hidden_states)))


class CLIPEncoderLayer(nn.Cell):
    """Pre-norm block: x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""

    def __init__(self, config, causal=False, max_length=None):
        super().__init__()
        self.self_attn = CLIPAttention(config, causal, max_length)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, hidden_states):
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Cell):
    def __init__(self, config, causal=False, max_length=None):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(config, causal, max_length) for _ in range(config.num_hidden_layers)])

    def construct(self, hidden_states):
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class CLIPVisionEmbeddings(nn.Cell):
    """[class token; patch tokens] + learned position embeddings, for images of exactly ``image_size``."""

    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size
        self.num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.class_embedding = Parameter(initializer(Normal(dim**-0.5), (dim,), ms.float32), name="class_embedding")
        self.patch_embedding = Conv2d(config.num_channels, dim, config.patch_size, stride=config.patch_size, bias=False)
        self.position_embedding = Embedding(self.num_positions, dim)

    def construct(self, pixel_values):
        patches = self.patch_embedding(pixel_values)  # [B, D, grid, grid]
        b, dim = patches.shape[0], patches.shape[1]
        patches = patches.reshape(b, dim, -1).transpose(0, 2, 1)
        cls = ops.broadcast_to(self.class_embedding.reshape(1, 1, dim), (b, 1, dim))
        embeddings = ops.concat((cls, patches), 1)
        return embeddings + self.position_embedding.weight.reshape(1, self.num_positions, dim)


class CLIPVisionTransformer(nn.Cell):
    """transformers' ``CLIPVisionModel`` body: embeddings, ``pre_layrnorm`` (sic), encoder, ``post_layernorm``."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, pixel_values):
        hidden_states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return self.post_layernorm(hidden_states[:, 0])


def _drop_position_ids(state, key):
    """Remove a legacy ``position_ids`` buffer after checking it holds 0..N-1, the positions the model uses."""
    if key not in state:
        return
    ids = np.asarray(state.pop(key)).reshape(-1)
    if not np.array_equal(ids, np.arange(ids.size)):
        raise ValueError(f"{key} is not 0..{ids.size - 1}: custom position ids are not supported")
    logger.debug("dropped the %s buffer (0..%d, as the model computes)", key, ids.size - 1)


class CLIPVisionModelWithProjection(nn.Cell):
    """pixel_values [B, C, image_size, image_size] (already normalised) -> image_embeds [B, projection_dim]."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = Linear(config.hidden_size, config.projection_dim, bias=False)

    @classmethod
    def from_config(cls, config_dict):
        return cls(config_from_dict(CLIPVisionConfig, config_dict))

    @staticmethod
    def convert_state_dict(state):
        """A checkpoint state dict in this model's keys (drops a legacy ``position_ids`` buffer after checking it)."""
        state = dict(state)
        _drop_position_ids(state, "vision_model.embeddings.position_ids")
        return state

    def construct(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values))


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size)

    def construct(self, input_ids):
        length = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class CLIPTextModel(nn.Cell):
    """input_ids [B, L<=max_position_embeddings] (int) -> last_hidden_state [B, L, hidden_size], causal attention."""

    LEGACY_PREFIX = "text_model."

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config, causal=True, max_length=config.max_position_embeddings)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @classmethod
    def from_config(cls, config_dict):
        return cls(config_from_dict(CLIPTextConfig, config_dict))

    @classmethod
    def convert_state_dict(cls, state):
        """A checkpoint state dict in this model's keys.

        transformers 4 saved ``CLIPTextModel`` under ``text_model.`` (and older versions also saved the
        ``text_model.embeddings.position_ids`` buffer); transformers 5 saves the same tensors without the prefix.
        """
        if any(k.startswith(cls.LEGACY_PREFIX) for k in state):
            state = {(k[len(cls.LEGACY_PREFIX):] if k.startswith(cls.LEGACY_PREFIX) else k): v for k, v in state.items()}
        else:
            state = dict(state)
        _drop_position_ids(state, "embeddings.position_ids")
        return state

    def construct(self, input_ids):
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
