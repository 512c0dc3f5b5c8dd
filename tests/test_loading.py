"""Checked checkpoint loading: every missing, unexpected or mis-shaped key is named; files and ids resolved."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from framegraph.models.loading import CheckpointError, load_component, resolve_model_path

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture()
def vae_folder(tmp_path, svd_tiny):
    folder = tmp_path / "vae"
    shutil.copytree(svd_tiny / "vae", folder)
    return folder


@pytest.fixture(scope="module")
def vae_cls(ms):
    from framegraph.models.autoencoder_kl_temporal_decoder import AutoencoderKLTemporalDecoder

    return AutoencoderKLTemporalDecoder


def _edit(folder, edit):
    state = load_file(str(folder / WEIGHTS))
    edit(state)
    save_file(state, str(folder / WEIGHTS))


def test_loads_fp32_and_fp16_variant(vae_cls, vae_folder):
    net = load_component(vae_cls, vae_folder)
    assert {str(p.dtype) for p in net.get_parameters()} == {"Float32"}
    net16 = load_component(vae_cls, vae_folder, variant="fp16", dtype="float16")
    assert {str(p.dtype) for p in net16.get_parameters()} == {"Float16"}


def test_missing_key_is_named(vae_cls, vae_folder):
    _edit(vae_folder, lambda s: s.pop("decoder.conv_out.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing: decoder\.conv_out\.bias"):
        load_component(vae_cls, vae_folder)


def test_renamed_key_is_missing_and_unexpected(vae_cls, vae_folder):
    _edit(vae_folder, lambda s: s.__setitem__("decoder.conv_out.bias_renamed", s.pop("decoder.conv_out.bias")))
    with pytest.raises(CheckpointError) as info:
        load_component(vae_cls, vae_folder)
    message = str(info.value)
    assert "missing: decoder.conv_out.bias" in message
    assert "unexpected: decoder.conv_out.bias_renamed" in message


def test_wrong_shape_is_named_with_both_shapes(vae_cls, vae_folder):
    _edit(vae_folder, lambda s: s.__setitem__("decoder.conv_out.weight", s["decoder.conv_out.weight"][:, :-1]))
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.weight: checkpoint \(3, 31, 3, 3\) vs model "
                                              r"\(3, 32, 3, 3\)"):
        load_component(vae_cls, vae_folder)


def test_missing_config_json(vae_cls, vae_folder):
    (vae_folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_component(vae_cls, vae_folder)


def test_missing_weights_and_missing_variant(vae_cls, vae_folder):
    (vae_folder / WEIGHTS).rename(vae_folder / "kept")
    with pytest.raises(CheckpointError, match=r"svd-export --variant fp16 \(variant='fp16' in Python\)"):
        load_component(vae_cls, vae_folder)  # only fp16 files: the hint names the CLI flag
    (vae_folder / "kept").rename(vae_folder / WEIGHTS)
    (vae_folder / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no variant 'fp16'.*leave out svd-export --variant"):
        load_component(vae_cls, vae_folder, variant="fp16")
    (vae_folder / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        load_component(vae_cls, vae_folder)


def test_unknown_dtype(vae_cls, vae_folder):
    with pytest.raises(ValueError, match="dtype"):
        load_component(vae_cls, vae_folder, dtype="bfloat8")


def test_model_path_resolution(tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="not a folder"):
        resolve_model_path(str(tmp_path / "nope"))
    # a hub id without network: the error says to pass a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="local"):
        resolve_model_path("stabilityai/stable-video-diffusion-img2vid-xt")
