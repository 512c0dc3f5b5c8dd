"""The mindspore_lite backend on the real MindSpore Lite 2.0 runtime (set up as `framegraph setup-lite` does): both
tiny pipelines, exported with ``--formats mslite``, equal diffusers' golden outputs with the tolerances of the ONNX
Runtime tests; the graphs are checked when opened; a missing runtime is a clear error.

Lite and MindSpore cannot be loaded into one process (undefined symbols, either order), and the test workers import
MindSpore for the exports. So every Lite run here happens in a child process that imports neither MindSpore nor
ONNX Runtime (both blocked: what an edge box runs), which writes the outputs for the test to compare.
"""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from helpers import run_cli
from framegraph.runtime.manifest import Manifest

TOLERANCE = 2e-3  # the frames' max abs error allowed on every backend (test_pipeline_svd / _t2v)
T2V = json.loads((FIXTURES / "t2v-tiny" / "golden.json").read_text())

CHILD = textwrap.dedent("""
    import pickle, sys
    for blocked in ("mindspore", "onnxruntime", "torch", "diffusers"):
        sys.modules[blocked] = None  # an import of any of them fails: the Lite runtime needs none
    import numpy as np
    import framegraph.runtime as fr

    with open(sys.argv[1], "rb") as f:
        kind, artifact, calls = pickle.load(f)
    cls = {"svd": fr.StableVideoDiffusionPipeline, "t2v": fr.TextToVideoSDPipeline}[kind]
    pipe = cls.from_artifacts(artifact, backend="mindspore_lite", num_threads=1)
    pipe.set_progress_bar_config(disable=True)
    default = pipe.scheduler
    outputs = {}
    for name, (args, kwargs, scheduler) in calls.items():
        pipe.scheduler = getattr(fr, scheduler).from_config(default.config) if scheduler else default
        outputs[name] = np.asarray(pipe(*args, **kwargs).frames)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("mindspore", "onnxruntime", "mindspore_lite")
                   and sys.modules[m] is not None)
    np.savez(sys.argv[2], heavy=np.array(heavy, dtype=object), **outputs)
""")


def run_on_lite(tmp_path, kind, artifact, calls):
    """``calls``: name -> (args, kwargs, scheduler class name or None) of the pipeline, run on the Lite backend in
    a child process; returns name -> output, and the engine modules the child had imported."""
    request, reply = tmp_path / f"{kind}.pkl", tmp_path / f"{kind}.npz"
    with open(request, "wb") as f:
        pickle.dump((kind, str(artifact), calls), f)
    result = subprocess.run([sys.executable, "-c", CHILD, str(request), str(reply)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with np.load(reply, allow_pickle=True) as data:
        outputs = {k: data[k] for k in data.files}
    return outputs, list(outputs.pop("heavy"))


def assert_equal_goldens(outputs, golden):
    """Each output equals diffusers' golden of the same key within TOLERANCE (max abs error)."""
    for key, out in outputs.items():
        assert out.shape == golden[key].shape, key
        err = float(np.abs(out - golden[key]).max())
        assert err <= TOLERANCE, f"{key} on MindSpore Lite: max abs error {err:.2e}"


def test_svd_equals_diffusers_on_lite_with_neither_mindspore_nor_onnxruntime(svd_artifact, svd_golden,
                                                                             svd_golden_call, tmp_path):
    image = Image.open(FIXTURES / "svd-tiny" / "input.png").convert("RGB")
    base = dict(svd_golden_call["pipeline_call"], latents=svd_golden["pipeline.latents"],
                image_noise=svd_golden["pipeline.image_noise"], output_type="np")
    calls = {"pipeline.frames": ((image,), base, None),
             "pipeline.frames_chunk1": ((image,), dict(base, decode_chunk_size=1), None),
             "pipeline.final_latents": ((image,), dict(base, output_type="latent"), None)}
    outputs, heavy = run_on_lite(tmp_path, "svd", svd_artifact, calls)
    assert_equal_goldens(outputs, svd_golden)
    assert heavy == []


def test_text_to_video_equals_diffusers_on_lite(t2v_artifact, t2v_golden, tmp_path):
    base = dict(T2V["pipeline_call"], latents=t2v_golden["pipeline.latents"])
    prompt = (T2V["prompt"],)
    calls = {"pipeline.frames_ddim": (prompt, base, None),
             "pipeline.frames_ddim_negative": (prompt, dict(base, negative_prompt=T2V["negative_prompt_case"]), None),
             "pipeline.frames_dpmsolver": (prompt, dict(base, num_inference_steps=T2V["dpmsolver_steps"]),
                                           "DPMSolverMultistepScheduler")}
    outputs, _ = run_on_lite(tmp_path, "t2v", t2v_artifact, calls)
    assert_equal_goldens(outputs, t2v_golden)


def test_step_caching_equals_deepcache_on_lite(t2v_artifact, t2v_golden, tmp_path):
    """The step-caching graphs (branch 1 in the shared text-to-video artifact) on Lite equal DeepCache's frames
    (tests/fixtures/deepcache, see test_step_cache.py) within that case's tolerance there."""
    spec = json.loads((FIXTURES / "deepcache" / "golden.json").read_text())["cases"]
    golden = np.load(FIXTURES / "deepcache" / "golden.npz")
    calls = {name: ((T2V["prompt"],), dict(spec[name]["call"], latents=t2v_golden["pipeline.latents"],
                                           cache_interval=spec[name]["cache_interval"]), None)
             for name in ("t2v_n2_b1", "t2v_n3_b1")}
    outputs, _ = run_on_lite(tmp_path, "t2v", t2v_artifact, calls)
    for name, out in outputs.items():
        allowed = min(TOLERANCE, 0.25 * spec[name]["max_abs_cached_vs_uncached"])
        assert float(np.abs(out - golden[f"{name}.frames"]).max()) <= allowed, name


def test_every_lite_graph_was_converted_and_checked_at_export(svd_artifact, t2v_artifact):
    for artifact in (svd_artifact, t2v_artifact):
        manifest = Manifest.load(artifact)
        onnx = {(g.name, tuple(sorted(g.bucket.items()))) for g in manifest.graphs if g.format == "onnx"}
        lite = [g for g in manifest.graphs if g.format == "mslite"]
        assert {(g.name, tuple(sorted(g.bucket.items()))) for g in lite} == onnx
        for graph in lite:
            assert graph.files[0].path.endswith(".ms") and (artifact / graph.files[0].path).is_file()
            assert graph.max_abs_error is not None and graph.max_abs_error <= graph.tolerance, graph.key


def test_a_lite_graph_whose_manifest_was_edited_is_refused_when_opened(svd_artifact, tmp_path):
    """The signature Lite reads from the .ms file is checked against the manifest (an edited shape is refused)."""
    code = textwrap.dedent("""
        import json, shutil, sys
        sys.modules["mindspore"] = None
        from pathlib import Path
        from framegraph.runtime.backends import load_backend
        from framegraph.runtime.manifest import ArtifactError, Manifest
        folder = Path(sys.argv[1])
        manifest = Manifest.load(folder)
        entry = next(g for g in manifest.graphs if g.format == "mslite" and g.name == "unet")
        load_backend("mindspore_lite").open(folder, entry)  # as exported: opens
        entry.inputs[0].shape = [d + 1 for d in entry.inputs[0].shape]
        try:
            load_backend("mindspore_lite").open(folder, entry)
        except ArtifactError as exc:
            print("refused:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", code, str(svd_artifact)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused:" in result.stdout and "the graph file has" in result.stdout, result.stdout


def test_without_lite_set_up_the_backend_says_to_run_setup_lite(tmp_path):
    code = "from framegraph.runtime.backends import load_backend; load_backend('mindspore_lite')"
    env = {k: v for k, v in os.environ.items() if k != "MSLITE_HOME"}
    env["FRAMEGRAPH_CACHE"] = str(tmp_path / "empty-cache")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "BackendUnavailableError" in result.stderr and "framegraph setup-lite" in result.stderr
    assert "MSLITE_HOME" in result.stderr


def test_setup_lite_command_reports_the_install_and_refuses_a_bad_home(lite_install, tmp_path):
    done = run_cli("setup-lite")
    assert done.returncode == 0 and "MindSpore Lite is set up" in done.stderr and str(lite_install.shim) in done.stderr
    refused = run_cli("setup-lite", "--mslite-home", tmp_path / "nothing-here")
    assert refused.returncode == 2 and "nothing-here" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.parametrize("flags, message", [
    (["--formats", "mslite"], "run `framegraph setup-lite` once"),
    (["--formats", "onnx,mslite", "--quantize", "int8"], "--quantize does not go with --formats mslite"),
])
def test_export_refuses_mslite_it_cannot_do_before_loading_the_model(svd_tiny, tmp_path, flags, message):
    env = {k: v for k, v in os.environ.items() if k != "MSLITE_HOME"}
    env["FRAMEGRAPH_CACHE"] = str(tmp_path / "empty-cache")
    result = run_cli(svd_tiny, "--out", tmp_path / "art", "--frames", 2, "--height", 32, "--width", 32, *flags,
                     module="framegraph.export.cli", env=env)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "art").exists()
