"""Graph specs of the ModelScope / VideoFusion text-to-video pipeline (diffusers' TextToVideoSDPipeline)."""

import numpy as np

from framegraph.export.specs import GraphSpec, TensorDef, _randn, latent_dims, vae_decoder_spec

DEFAULT_DECODE_SLICE = 8


def graph_specs(dims):
    f = dims["vae_scale_factor"]
    length = dims["max_length"]

    text_encoder = GraphSpec(
        name="text_encoder",
        inputs=(TensorDef("input_ids", "int64", lambda b: (b["batch"], length)),),
        outputs=(TensorDef("last_hidden_state", "float", lambda b: (b["batch"], length, dims["text_hidden_size"])),),
        sample=lambda b, rng: [rng.integers(0, dims["vocab_size"], (b["batch"], length))],
        bucket_keys=("batch",),
    )

    def unet_shape(channels):
        return lambda b: (b["batch"], channels, b["num_frames"], b["height"] // f, b["width"] // f)

    unet = GraphSpec(
        name="unet",
        inputs=(
            TensorDef("sample", "float", unet_shape(dims["unet_in_channels"])),
            TensorDef("timestep", "float32", lambda b: ()),
            TensorDef("encoder_hidden_states", "float", lambda b: (b["batch"], length, dims["cross_attention_dim"])),
        ),
        outputs=(TensorDef("noise_pred", "float", unet_shape(dims["unet_out_channels"])),),
        sample=lambda b, rng: [
            _randn(rng, unet_shape(dims["unet_in_channels"])(b)),
            np.array(float(rng.integers(0, 1000)), dtype=np.float32),
            _randn(rng, (b["batch"], length, dims["cross_attention_dim"])),
        ],
        bucket_keys=("num_frames", "batch", "height", "width"),
    )
    vae_decoder = vae_decoder_spec(dims)
    return {s.name: s for s in (text_encoder, unet, vae_decoder)}


def dims(text_config, vae_config, unet_config):
    return {
        "max_length": int(text_config.get("max_position_embeddings", 77)),
        "vocab_size": int(text_config["vocab_size"]),
        "text_hidden_size": int(text_config["hidden_size"]),
        **latent_dims(vae_config, unet_config),
    }


def buckets(frames, height, width, batch, decode_chunk_sizes, guidance_batches=(2, 1)):
    """Text encoder per batch; UNet per frame count for the guidance (2B) and no-guidance (B) batches; the
    per-frame VAE decoder for each slice size (default: min(8, longest bucket)); the runtime loops slices."""
    plan = [("text_encoder", {"batch": batch})]
    for num_frames in frames:
        for factor in guidance_batches:
            plan.append(("unet", {"num_frames": num_frames, "batch": factor * batch, "height": height, "width": width}))
    slices = decode_chunk_sizes or [min(DEFAULT_DECODE_SLICE, max(frames))]
    for chunk in sorted(set(slices)):
        plan.append(("vae_decoder", {"chunk": chunk, "height": height, "width": width}))
    return plan
