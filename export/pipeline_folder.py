"""A diffusers-format pipeline folder (:class:`PipelineFolder`): its model index, configs and weights, and its
components built or loaded as MindSpore models one at a time."""

import hashlib
import importlib
import json
import logging
from pathlib import Path

from framegraph.models import loading

logger = logging.getLogger(__name__)

# diffusers / transformers class name -> (framegraph.models module, class)
MODEL_CLASSES = {
    "UNetSpatioTemporalConditionModel": ("unet_spatio_temporal_condition", "UNetSpatioTemporalConditionModel"),
    "AutoencoderKLTemporalDecoder": ("autoencoder_kl_temporal_decoder", "AutoencoderKLTemporalDecoder"),
    "CLIPVisionModelWithProjection": ("clip", "CLIPVisionModelWithProjection"),
    "CLIPTextModel": ("clip", "CLIPTextModel"),
    "UNet3DConditionModel": ("unet_3d_condition", "UNet3DConditionModel"),
    "AutoencoderKL": ("autoencoder_kl", "AutoencoderKL"),
}


def model_class(class_name):
    if class_name not in MODEL_CLASSES:
        raise ValueError(f"framegraph has no MindSpore model for {class_name!r}; supported: {sorted(MODEL_CLASSES)}")
    module, name = MODEL_CLASSES[class_name]
    return getattr(importlib.import_module(f"framegraph.models.{module}"), name)


def read_model_index(folder):
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: MODEL must be a diffusers-format pipeline folder (with model_index.json) or hub id"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class PipelineFolder:
    """A diffusers pipeline folder; components are built one at a time so only one is resident."""

    def __init__(self, folder, variant=None, dtype="float32", random_weights=False, seed=0):
        self.folder = Path(folder)
        self.index = read_model_index(self.folder)
        self.variant = variant
        self.dtype = dtype
        self.random_weights = random_weights
        self.seed = seed

    @property
    def pipeline_class(self):
        return self.index.get("_class_name")

    def config(self, component):
        return loading.read_config(self.folder / component)

    def class_name(self, component):
        entry = self.index.get(component)
        if not entry or entry[1] is None:
            raise ValueError(f"{self.folder}/model_index.json has no component {component!r}")
        return entry[1]

    def build(self, component):
        cls = model_class(self.class_name(component))
        if self.random_weights:
            import mindspore as ms

            ms.set_seed(self.seed)
            net = cls.from_config(self.config(component))
            if self.dtype != "float32":
                loading.cast_parameters(net, self.dtype)
            logger.info("built %s with random weights (%d parameters)", component, loading.count_parameters(net))
            return net
        return loading.load_component(cls, self.folder / component, self.variant, self.dtype)

    def parameter_bytes(self, component):
        """Memory the component's parameters take once built (from shapes only; nothing is allocated)."""
        cls = model_class(self.class_name(component))
        net = loading.build_uninitialised(cls, self.config(component))
        return loading.count_parameters(net) * (2 if self.dtype == "float16" else 4)

    def weights_hash(self, components):
        """sha256 over the components' configs and weight files (or configs + seed for random weights)."""
        h = hashlib.sha256()
        for component in components:
            h.update(json.dumps(self.config(component), sort_keys=True).encode())
            if self.random_weights:
                h.update(f"random-weights seed={self.seed}".encode())
                continue
            for path in loading.weight_files(self.folder / component, self.variant):
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        h.update(block)
        return h.hexdigest()
