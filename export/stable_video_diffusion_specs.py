"""Graph specs of the Stable Video Diffusion pipeline (diffusers' component and argument names)."""

import numpy as np

from framegraph.export.specs import GraphSpec, TensorDef, _randn, latent_dims, vae_decoder_spec


def graph_specs(dims):
    """Specs for an SVD model with dimensions ``dims`` (see ``dims``)."""
    f = dims["vae_scale_factor"]
    size = dims["clip_image_size"]
    latent = dims["latent_channels"]

    image_encoder = GraphSpec(
        name="image_encoder",
        inputs=(TensorDef("pixel_values", "float", lambda b: (b["batch"], 3, size, size)),),
        outputs=(TensorDef("image_embeds", "float", lambda b: (b["batch"], dims["projection_dim"])),),
        sample=lambda b, rng: [_randn(rng, (b["batch"], 3, size, size))],
        bucket_keys=("batch",),
    )
    vae_encoder = GraphSpec(
        name="vae_encoder",
        inputs=(TensorDef("sample", "float", lambda b: (b["batch"], 3, b["height"], b["width"])),),
        outputs=(TensorDef("latent", "float", lambda b: (b["batch"], latent, b["height"] // f, b["width"] // f)),),
        sample=lambda b, rng: [np.clip(_randn(rng, (b["batch"], 3, b["height"], b["width"])), -1, 1)],
        bucket_keys=("batch", "height", "width"),
    )

    def unet_shape(channels):
        return lambda b: (b["batch"], b["num_frames"], channels, b["height"] // f, b["width"] // f)

    def unet_sample(b, rng):
        batch = b["batch"]
        return [
            _randn(rng, unet_shape(dims["unet_in_channels"])(b)),
            np.array(0.25 * np.log(rng.uniform(0.5, 50.0)), dtype=np.float32),
            _randn(rng, (batch, 1, dims["cross_attention_dim"])),
            np.tile(np.array([[6.0, 127.0, 0.02]], dtype=np.float32), (batch, 1)),
        ]

    unet = GraphSpec(
        name="unet",
        inputs=(
            TensorDef("sample", "float", unet_shape(dims["unet_in_channels"])),
            TensorDef("timestep", "float32", lambda b: ()),
            TensorDef("encoder_hidden_states", "float", lambda b: (b["batch"], 1, dims["cross_attention_dim"])),
            TensorDef("added_time_ids", "float", lambda b: (b["batch"], 3)),
        ),
        outputs=(TensorDef("noise_pred", "float", unet_shape(dims["unet_out_channels"])),),
        sample=unet_sample,
        bucket_keys=("num_frames", "batch", "height", "width"),
    )
    vae_decoder = vae_decoder_spec(dims)
    return {s.name: s for s in (image_encoder, vae_encoder, unet, vae_decoder)}


def dims(image_encoder_config, vae_config, unet_config):
    return {
        "clip_image_size": int(image_encoder_config["image_size"]),
        "projection_dim": int(image_encoder_config["projection_dim"]),
        **latent_dims(vae_config, unet_config),
    }


def buckets(frames, height, width, batch, decode_chunk_sizes, guidance_batches=(2, 1)):
    """The (graph name, bucket) pairs an SVD export compiles.

    UNet: one graph per frame count, for the classifier-free-guidance batch (2B) and the guidance-off batch (B).
    VAE decoder: one per chunk length a decode can see: each requested chunk size (capped at the frame count) and
    the remainder ``F mod n``; the default chunk size is the frame count (diffusers' ``decode_chunk_size=None``).
    """
    plan = [("image_encoder", {"batch": batch}), ("vae_encoder", {"batch": batch, "height": height, "width": width})]
    for num_frames in frames:
        for factor in guidance_batches:
            plan.append(("unet", {"num_frames": num_frames, "batch": factor * batch, "height": height, "width": width}))
    chunks = set()
    for num_frames in frames:
        for n in decode_chunk_sizes or [num_frames]:
            chunks.add(min(n, num_frames))
            if num_frames % n and n < num_frames:
                chunks.add(num_frames % n)
    for chunk in sorted(chunks):
        plan.append(("vae_decoder", {"chunk": chunk, "height": height, "width": width}))
    return plan
