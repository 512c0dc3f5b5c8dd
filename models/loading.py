"""Loading diffusers-format checkpoints into the MindSpore models: a checked 1:1 copy of every key.

A component folder (``unet/``, ``vae/``, ``image_encoder/``, ...) holds ``config.json`` and safetensors weights,
either one file or shards with an ``*.safetensors.index.json``, optionally as a variant (``*.fp16.safetensors``).
"""

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
DTYPES = ("float32", "float16")


class CheckpointError(ValueError):
    """The checkpoint does not match the model: missing, unexpected or mis-shaped keys, or missing files."""


def resolve_model_path(model):
    """A local folder as is; otherwise a hub repo id downloaded with ``huggingface_hub`` (needs network)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise FileNotFoundError(f"{model!r} is not a folder. Pass a local diffusers-format model folder or a hub repo id.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise FileNotFoundError(
            f"{model!r} is not a local folder, and resolving hub repo ids needs huggingface_hub "
            "(pip install 'framegraph[hub]'); or pass a local diffusers-format folder."
        ) from exc
    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        raise FileNotFoundError(
            f"could not fetch {model!r} from the hub ({type(exc).__name__}: {exc}). Offline? Download the model "
            "elsewhere and pass its local folder instead."
        ) from exc


def read_config(folder):
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a diffusers-format component folder needs its config.json.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def config_from_dict(config_cls, config):
    """Build a config dataclass from a ``config.json`` dict; diffusers' bookkeeping keys (``_*``) are dropped."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(k for k in config if k not in names and not k.startswith("_"))
    if unknown:
        logger.debug("%s ignores config keys %s", config_cls.__name__, unknown)
    return config_cls(**{k: v for k, v in config.items() if k in names})


def weight_files(folder, variant=None):
    """The safetensors files of a component folder (sharded or not), for the given variant."""
    folder = Path(folder)
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for stem in WEIGHT_STEMS:
        single = folder / f"{stem}{suffix}"
        if single.is_file():
            return [single]
        index = folder / f"{stem}{suffix}.index.json"
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [folder / s for s in shards]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    variants = sorted({name.split(".")[-2] for name in found if name.count(".") >= 2})
    hint = ""
    if found and variants and variant not in variants:
        hint = (f" Load the {variants[0]} files with svd-export --variant {variants[0]} "
                f"(variant={variants[0]!r} in Python).")
    elif found and variant is not None:
        hint = " These are the default files: leave out svd-export --variant (variant=None in Python)."
    raise CheckpointError(
        f"no {'variant ' + repr(variant) + ' ' if variant else ''}safetensors weights in {folder} "
        f"(looked for {', '.join(s + suffix for s in WEIGHT_STEMS)}; found {found or 'none'})." + hint
    )


def read_state_dict(folder, variant=None):
    from safetensors.numpy import load_file

    state = {}
    for path in weight_files(folder, variant):
        state.update(load_file(str(path)))
    return state


def model_parameters(net):
    """``{checkpoint key: Parameter}`` of a MindSpore cell, keyed by attribute path."""
    return dict(net.parameters_and_names())


def check_state_dict(params, state):
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key."""
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
        for k in set(params) & set(state)
        if tuple(state[k].shape) != tuple(params[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {', '.join(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} with the wrong shape: {'; '.join(misshaped)}")
    if problems:
        raise CheckpointError(
            "checkpoint does not match the model config — " + " | ".join(problems)
            + ". Check that the folder and its config.json belong together (and the variant)."
        )


def load_state_dict_into(net, state, dtype="float32"):
    """Copy a checked state dict into ``net``'s parameters, cast to ``dtype``."""
    import mindspore as ms

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {DTYPES}")
    params = model_parameters(net)
    check_state_dict(params, state)
    ms_dtype = ms.float16 if dtype == "float16" else ms.float32
    for key, param in params.items():
        value = np.ascontiguousarray(state[key], dtype=np.dtype(dtype))
        if param.dtype != ms_dtype:
            param.set_dtype(ms_dtype)
        param.set_data(ms.Tensor(value))
    return net


def cast_parameters(net, dtype):
    """Cast all parameters (e.g. random weights) to ``dtype`` in place."""
    import mindspore as ms

    ms_dtype = ms.float16 if dtype == "float16" else ms.float32
    for param in net.get_parameters():
        if param.dtype != ms_dtype:
            value = param.asnumpy().astype(np.dtype(dtype))
            param.set_dtype(ms_dtype)
            param.set_data(ms.Tensor(value))
    return net


def count_parameters(net):
    """Number of scalar parameters, from shapes only (lazily initialised weights are not materialised)."""
    return int(sum(int(np.prod(p.shape)) for p in net.get_parameters()))


def build_uninitialised(model_cls, config):
    """Build a model without filling its parameters (for loading or counting): seconds instead of minutes at
    real size."""
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        return model_cls.from_config(config)


def load_component(model_cls, folder, variant=None, dtype="float32"):
    """Build ``model_cls`` from ``folder/config.json`` and load its weights (every key and shape checked).

    A model class may define ``convert_state_dict(state)`` for layouts older libraries wrote (e.g. transformers 4's
    ``text_model.`` prefix); it must return a state dict in the model's own key layout.
    """
    folder = Path(folder)
    config = read_config(folder)  # a missing config.json fails before any weights are read
    net = build_uninitialised(model_cls, config)
    state = read_state_dict(folder, variant)
    convert = getattr(model_cls, "convert_state_dict", None)
    if convert is not None:
        state = convert(state)
    load_state_dict_into(net, state, dtype)
    logger.info("loaded %s from %s (%d tensors, %s)", model_cls.__name__, folder, len(state), dtype)
    return net
