"""svd-export on the tiny fixture: manifest, graph signatures, checks, golden reproduction, safe writes."""

import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

from framegraph.runtime.manifest import Manifest, sha256_file
from helpers import assert_close_scaled

ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_manifest_lists_every_bucket(svd_artifact):
    m = Manifest.load(svd_artifact)
    assert m.pipeline == "stable-video-diffusion"
    keys = {(g.name, g.format, tuple(sorted(g.bucket.items()))) for g in m.graphs}
    for fmt in ("onnx", "mindir"):
        for frames in (2, 3):
            for batch in (1, 2):
                bucket = {"num_frames": frames, "batch": batch, "height": 32, "width": 32}
                assert ("unet", fmt, tuple(sorted(bucket.items()))) in keys
        for chunk in (1, 2):
            assert ("vae_decoder", fmt, tuple(sorted({"chunk": chunk, "height": 32, "width": 32}.items()))) in keys
    assert m.constants["vae_scaling_factor"] == pytest.approx(0.18215)
    assert m.constants["vae_scale_factor"] == 2
    assert m.scheduler["_class_name"] == "EulerDiscreteScheduler"
    assert m.toolchain["mindspore"] and m.toolchain["onnx_opset"]
    assert m.source["weights_sha256"] and len(m.source["weights_sha256"]) == 64
    for g in m.graphs:
        assert g.max_abs_error is not None and g.max_abs_error <= g.tolerance == 1e-4
        for f in g.files:
            assert sha256_file(svd_artifact / f.path) == f.sha256
    assert (svd_artifact / "feature_extractor" / "preprocessor_config.json").is_file()


def test_onnx_signatures_equal_manifest(svd_artifact):
    m = Manifest.load(svd_artifact)
    for g in m.graphs:
        if g.format != "onnx":
            continue
        s = _session(svd_artifact / g.main_file)
        got = [(i.name, ORT_DTYPES[i.type], list(i.shape)) for i in s.get_inputs()]
        assert got == [(t.name, t.dtype, t.shape) for t in g.inputs], g.key
        got = [(o.name, ORT_DTYPES[o.type], list(o.shape)) for o in s.get_outputs()]
        assert got == [(t.name, t.dtype, t.shape) for t in g.outputs], g.key


def test_mindir_graphs_run_with_manifest_shapes(svd_artifact, ms):
    from mindspore import nn

    m = Manifest.load(svd_artifact)
    rng = np.random.default_rng(0)
    for g in m.graphs:
        if g.format != "mindir":
            continue
        cell = nn.GraphCell(ms.load(str(svd_artifact / g.main_file)))
        feeds = [ms.Tensor(rng.standard_normal(t.shape).astype(t.dtype)) for t in g.inputs]
        out = cell(*feeds)
        out = out if isinstance(out, (tuple, list)) else (out,)
        assert [list(o.shape) for o in out] == [t.shape for t in g.outputs], g.key
        assert (svd_artifact / g.main_file.replace(".mindir", ".converter.cfg")).is_file()


def test_onnx_graphs_use_only_standard_ops(svd_artifact):
    from framegraph.export.onnx_graph import op_types

    m = Manifest.load(svd_artifact)
    ops = set()
    for g in m.graphs:
        if g.format == "onnx":
            ops |= set(op_types(svd_artifact / g.main_file))
    assert {domain for domain, _ in ops} == {""}, ops
    print("ONNX op types:", sorted(op for _, op in ops))


def test_golden_reproduced_by_exported_graphs_alone(svd_artifact, svd_golden):
    m = Manifest.load(svd_artifact)
    g = svd_golden
    unet = _session(svd_artifact / m.find("unet", "onnx", num_frames=2, batch=2).main_file)
    out = unet.run(None, {
        "sample": g["unet.sample"], "timestep": np.asarray(g["unet.timestep"], np.float32).reshape(()),
        "encoder_hidden_states": g["unet.encoder_hidden_states"], "added_time_ids": g["unet.added_time_ids"],
    })[0]
    assert_close_scaled(out, g["unet.out"], name="unet.out")
    dec = _session(svd_artifact / m.find("vae_decoder", "onnx", chunk=2).main_file)
    assert_close_scaled(dec.run(None, {"latents": g["vae_decode.latents"]})[0], g["vae_decode.sample"],
                        name="vae_decode.sample")
    enc = _session(svd_artifact / m.find("vae_encoder", "onnx", batch=1).main_file)
    assert_close_scaled(enc.run(None, {"sample": g["vae_encode.sample"]})[0], g["vae_encode.latent_mode"],
                        name="vae_encode.latent_mode")
    clip = _session(svd_artifact / m.find("image_encoder", "onnx", batch=1).main_file)
    for i in range(2):
        out = clip.run(None, {"pixel_values": g["image_encoder.pixel_values"][i:i + 1]})[0]
        assert_close_scaled(out, g["image_encoder.image_embeds"][i:i + 1], name="image_embeds")


def test_unet_weights_stored_once_for_all_buckets(svd_artifact):
    import onnx

    m = Manifest.load(svd_artifact)
    graphs = [g for g in m.graphs if g.name == "unet" and g.format == "onnx"]
    assert len(graphs) == 4
    assert {f.path for g in graphs for f in g.files if f.path.endswith(".bin")} == {"unet/weights.bin"}
    weight_bytes = (svd_artifact / "unet" / "weights.bin").stat().st_size
    params = sum(a.nbytes for name, a in _unet_params().items() if not UNREAD.search(name))
    # four buckets share one copy of the parameters; alignment padding and small constants only on top
    assert params <= weight_bytes < 1.05 * params
    for g in graphs:
        model = onnx.load(str(svd_artifact / g.main_file), load_external_data=False)
        embedded = [t.name for t in model.graph.initializer
                    if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024]
        assert not embedded, f"{g.key} embeds large tensors: {embedded[:3]}"


# SVD's cross-attention context is a single token, so the graphs compute attn2 from to_v and to_out alone
UNREAD = re.compile(r"transformer_blocks\.\d+\.(attn2\.to_q|attn2\.to_k|norm2)\.")


def _unet_params():
    from safetensors.numpy import load_file
    from conftest import FIXTURES

    return load_file(str(FIXTURES / "svd-tiny/pipeline/unet/diffusion_pytorch_model.safetensors"))


def test_single_key_cross_attention_weights_left_out(svd_artifact):
    import onnx

    entry = Manifest.load(svd_artifact).find("unet", "onnx", num_frames=3, batch=2)
    names = {t.name for t in onnx.load(str(svd_artifact / entry.main_file), load_external_data=False).graph.initializer}
    params = _unet_params()
    unread = {n for n in params if UNREAD.search(n)}
    assert unread and not unread & names
    value_weights = {n for n in params if n.endswith("attn2.to_v.weight")}
    assert value_weights and value_weights <= names


def test_moved_artifact_loads_from_any_directory(svd_artifact, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "moved-artifact"
    shutil.copytree(svd_artifact, moved)
    monkeypatch.chdir(tmp_path)
    m = Manifest.load(moved)
    entry = m.find("unet", "onnx", num_frames=3, batch=1)
    s = _session(moved / entry.main_file)
    feeds = {t.name: np.zeros(t.shape, t.dtype) for t in entry.inputs}
    assert s.run(None, feeds)[0].shape == tuple(entry.outputs[0].shape)
    # every weight lives in external data next to the graph, referenced by a relative path
    import onnx
    model = onnx.load(str(moved / entry.main_file), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"weights.bin"}


def _export_cmd(out, *extra):
    from conftest import FIXTURES

    return [sys.executable, "-m", "framegraph.export", str(FIXTURES / "svd-tiny" / "pipeline"), "--out", str(out),
            "--frames", "2", "--height", "32", "--width", "32", "--formats", "onnx", "--no-check", *extra]


def test_killed_export_leaves_no_complete_artifact_and_rerun_succeeds(tmp_path):
    out = tmp_path / "art"
    proc = subprocess.Popen(_export_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".art.partial-*/unet")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".art.partial-*")), "the export was killed before it staged anything"
    assert not (out / "manifest.json").exists()
    assert not out.exists()
    result = subprocess.run(_export_cmd(out), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "manifest.json").is_file()
    assert not list(tmp_path.glob(".art.partial-*")), "stale staging folder not cleaned"
    # identical options: every graph reused, files untouched (replacing an artifact needs --overwrite)
    before = {p: p.stat().st_ino for p in out.rglob("*.onnx")}
    result = subprocess.run(_export_cmd(out, "--overwrite"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reused" in result.stderr
    after = {p: p.stat().st_ino for p in out.rglob("*.onnx")}
    assert sorted(before) == sorted(after) and all(before[p] == after[p] for p in before)


@pytest.mark.parametrize("extra, message", [
    (["--height", "30"], "multiple of"),
    (["--frames", "0"], "--frames"),
    (["--formats", "tflite"], "--formats"),
    (["--attention-slice-mb", "-1"], "--attention-slice-mb"),
])
def test_bad_export_options_fail_clearly(tmp_path, extra, message):
    cmd = _export_cmd(tmp_path / "art")
    cmd += extra
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "art").exists()


def test_export_refuses_foreign_folder_and_non_pipeline(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = subprocess.run(_export_cmd(foreign), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "not a framegraph artifact" in result.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
    cmd = [sys.executable, "-m", "framegraph.export", str(tmp_path), "--out", str(tmp_path / "x")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "model_index.json" in result.stderr


def test_full_disk_fails_with_a_clear_message_and_no_artifact(tmp_path, monkeypatch, caplog):
    import errno

    from framegraph.export import cli, driver

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(driver, "_export_component", no_space)
    from conftest import FIXTURES

    out = tmp_path / "art"
    code = cli.main([str(FIXTURES / "svd-tiny" / "pipeline"), "--out", str(out), "--frames", "2", "--height", "32",
                     "--width", "32", "--formats", "onnx"])
    assert code == 2
    assert "no space left" in caplog.text and "--out on a" in caplog.text
    assert not out.exists() and not list(tmp_path.glob(".art.partial-*"))


def test_onnx_graphs_have_no_unused_initializers_or_nodes(svd_artifact, t2v_artifact):
    """ONNX Runtime warns once per unused initializer (a Constant node is one to it) whenever it builds a session:
    a user would see hundreds."""
    import onnx

    for artifact in (svd_artifact, t2v_artifact):
        for g in Manifest.load(artifact).graphs:
            if g.format != "onnx":
                continue
            graph = onnx.load(str(artifact / g.main_file), load_external_data=False).graph
            read = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
            unused = [t.name for t in graph.initializer if t.name not in read]
            assert not unused, f"{g.main_file}: {len(unused)} unused initializers, e.g. {unused[:3]}"
            dead = [n.name or n.op_type for n in graph.node if not any(o in read for o in n.output)]
            assert not dead, f"{g.main_file}: {len(dead)} nodes whose outputs nothing reads, e.g. {dead[:3]}"
