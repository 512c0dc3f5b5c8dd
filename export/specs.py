"""One spec per compiled graph: ordered inputs and outputs (names, dtypes, shapes as functions of the bucket) and
sample inputs for the export trace and the numerical check. Export and the manifest both read these objects."""

import dataclasses

import numpy as np

from framegraph.runtime.manifest import TensorSpec


@dataclasses.dataclass(frozen=True)
class TensorDef:
    name: str
    dtype: str
    shape: object  # callable(bucket) -> tuple of ints

    def spec(self, bucket, dtype=None):
        return TensorSpec(name=self.name, dtype=dtype or self.dtype, shape=list(self.shape(bucket)))


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """``name`` is the diffusers component name; ``float_dtype`` replaces 'float' dtypes for fp16 exports;
    ``weights_group`` names the folder whose ``weights.bin`` its ONNX graphs share (default: ``name``)."""

    name: str
    inputs: tuple
    outputs: tuple
    sample: object  # callable(bucket, rng) -> list of numpy arrays, in input order (float32)
    bucket_keys: tuple
    weights_group: str = None

    @property
    def weights_folder(self):
        return self.weights_group or self.name

    def input_specs(self, bucket, float_dtype="float32"):
        return [t.spec(bucket, _dtype(t.dtype, float_dtype)) for t in self.inputs]

    def output_specs(self, bucket, float_dtype="float32"):
        return [t.spec(bucket, _dtype(t.dtype, float_dtype)) for t in self.outputs]

    def sample_inputs(self, bucket, float_dtype="float32", seed=0):
        rng = np.random.default_rng(seed)
        arrays = self.sample(bucket, rng)
        specs = self.input_specs(bucket, float_dtype)
        out = []
        for spec, array in zip(specs, arrays):
            array = np.asarray(array).astype(spec.dtype)
            assert list(array.shape) == spec.shape, (self.name, spec.name, array.shape, spec.shape)
            out.append(array)
        return out


def _dtype(declared, float_dtype):
    # Timesteps stay float32 (the schedulers' continuous timesteps need the precision); other floats follow.
    return float_dtype if declared == "float" else declared


def _randn(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def latent_dims(vae_config, unet_config):
    """The sizes that the VAE and UNet configs give every pipeline's graphs: latent channels, the VAE's scale
    factor, the UNet's input / output channels, context width and number of down-samplings."""
    return {
        "latent_channels": int(vae_config.get("latent_channels", 4)),
        "vae_scale_factor": 2 ** (len(vae_config["block_out_channels"]) - 1),
        "unet_in_channels": int(unet_config["in_channels"]),
        "unet_out_channels": int(unet_config["out_channels"]),
        "cross_attention_dim": int(unet_config["cross_attention_dim"]),
        "unet_downsamples": len(unet_config["block_out_channels"]) - 1,
    }


def latent_constants(vae_config, dims):
    """The manifest constants every pipeline's runtime reads: the VAE's latent scaling and sizes."""
    return {
        "vae_scaling_factor": float(vae_config.get("scaling_factor", 0.18215)),
        "latent_channels": dims["latent_channels"],
        "vae_scale_factor": dims["vae_scale_factor"],
        "unet_in_channels": dims["unet_in_channels"],
    }


def vae_decoder_spec(dims):
    """The VAE decoder graph of every pipeline: ``chunk`` latent frames in, ``chunk`` frames out."""
    f = dims["vae_scale_factor"]
    latent = dims["latent_channels"]
    return GraphSpec(
        name="vae_decoder",
        inputs=(TensorDef("latents", "float", lambda b: (b["chunk"], latent, b["height"] // f, b["width"] // f)),),
        outputs=(TensorDef("sample", "float", lambda b: (b["chunk"], 3, b["height"], b["width"])),),
        sample=lambda b, rng: [_randn(rng, (b["chunk"], latent, b["height"] // f, b["width"] // f))],
        bucket_keys=("chunk", "height", "width"),
    )
