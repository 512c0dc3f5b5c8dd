"""Step caching (DeepCache): ``svd-export --cache-branch B`` and the ``cache_interval`` call argument.

The reference is the published DeepCache package (0.1.1, ``DeepCacheSDHelper``) on diffusers 0.42.1:
``tests/fixtures/deepcache/`` was written by ``scripts/make_deepcache_golden.py``. Each case's tolerance is the usual
end-to-end one (2e-3) or a quarter of how far caching moves that case's frames, whichever is smaller, so that an
uncached run (or a wrong branch) cannot pass.
"""

import json

import numpy as np
import pytest

from conftest import FIXTURES, SVD_CACHE_BRANCH, T2V_CACHE_BRANCH
from helpers import run_cli

GOLDEN = FIXTURES / "deepcache"


@pytest.fixture(scope="module")
def deepcache():
    spec = json.loads((GOLDEN / "golden.json").read_text(encoding="utf-8"))
    return spec["cases"], dict(np.load(GOLDEN / "golden.npz"))


def _tolerance(case):
    return min(2e-3, 0.25 * case["max_abs_cached_vs_uncached"])


def _svd_call(pipe, case, svd_golden, **kwargs):
    from PIL import Image

    image = Image.open(FIXTURES / "svd-tiny" / "input.png")
    return pipe(image, **case["call"], latents=svd_golden["pipeline.latents"],
                image_noise=svd_golden["pipeline.image_noise"], output_type="np", **kwargs).frames


def _t2v_call(pipe, case, t2v_golden, **kwargs):
    prompt = json.loads((FIXTURES / "t2v-tiny" / "golden.json").read_text(encoding="utf-8"))["prompt"]
    return pipe(prompt, **case["call"], latents=t2v_golden["pipeline.latents"], output_type="np", **kwargs).frames


@pytest.fixture(scope="module")
def svd_pipe(svd_cache_artifact, svd_tiny):
    """The step-caching artifact with the goldens' sampler (svd-tiny's Euler) selected the diffusers way."""
    from framegraph.runtime import StableVideoDiffusionPipeline
    from framegraph.runtime.schedulers import load_scheduler

    pipe = StableVideoDiffusionPipeline.from_artifacts(svd_cache_artifact)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = load_scheduler(svd_tiny / "scheduler")
    return pipe


def test_an_animatelcm_svd_folder_exports_and_runs_unchanged(svd_cache_artifact):
    """The export copies the folder's sampler; the artifact then samples with AnimateLCM-SVD's in few steps, the
    step noise from the call's generator, cached or not."""
    from PIL import Image

    from framegraph.runtime import StableVideoDiffusionPipeline
    from framegraph.runtime.schedulers import AnimateLCMSVDStochasticIterativeScheduler

    pipe = StableVideoDiffusionPipeline.from_artifacts(svd_cache_artifact)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, AnimateLCMSVDStochasticIterativeScheduler)
    assert pipe.scheduler.config.sigma_max == 700.0
    image = Image.open(FIXTURES / "svd-tiny" / "input.png")
    def run(seed, n):
        return pipe(image, num_inference_steps=4, generator=seed, cache_interval=n, output_type="np").frames

    plain = run(1, 1)
    assert plain.shape == (1, 2, 32, 32, 3) and np.all(np.isfinite(plain))
    np.testing.assert_array_equal(run(1, 1), plain)  # the same seed, the same video
    cached = run(1, 2)
    assert np.abs(cached - plain).max() > 1e-4  # cached steps change the frames
    assert np.abs(run(2, 2) - cached).max() > 1e-3  # another seed, another video


@pytest.mark.parametrize("name", ["svd_n2_b0", "svd_n3_b0"])
def test_svd_cached_frames_equal_deepcache(svd_pipe, svd_golden, deepcache, name):
    cases, arrays = deepcache
    case = cases[name]
    assert case["cache_branch"] == SVD_CACHE_BRANCH
    frames = _svd_call(svd_pipe, case, svd_golden, cache_interval=case["cache_interval"])
    assert np.abs(frames - arrays[f"{name}.frames"]).max() <= _tolerance(case)
    # the same call without caching equals diffusers' uncached frames
    plain = _svd_call(svd_pipe, case, svd_golden)
    assert np.abs(plain - arrays[f"{name}.frames_uncached"]).max() <= _tolerance(case)


def test_cache_interval_1_is_exactly_the_plain_unet(svd_pipe, svd_golden, deepcache):
    """cache_interval=1 (the default) runs the ``unet`` graph only, and gives the frames of a call without it."""
    cases, _ = deepcache
    case = cases["svd_n2_b0"]
    opened = []
    graph = svd_pipe.artifact.graph

    def record(name, **bucket):
        opened.append(name)
        return graph(name, **bucket)

    svd_pipe.artifact.graph = record
    try:
        once = _svd_call(svd_pipe, case, svd_golden, cache_interval=1)
    finally:
        del svd_pipe.artifact.graph
    assert "unet" in opened and not {"unet_deep", "unet_shallow"} & set(opened)
    np.testing.assert_array_equal(once, _svd_call(svd_pipe, case, svd_golden))


def test_the_cached_pair_shares_one_arena_and_frames_do_not_change(svd_cache_artifact, svd_pipe, svd_golden, deepcache):
    """On CPU the UNet graphs (not the streamed encoders and decoder) allocate from ONNX Runtime's process-wide
    arena (``shared_arena``), so the deep and the shallow graph do not each hold their working memory; the frames
    are bit-equal with it off."""
    from framegraph.runtime import StableVideoDiffusionPipeline

    case = deepcache[0]["svd_n2_b0"]
    shared = _svd_call(svd_pipe, case, svd_golden, cache_interval=2)
    step = svd_pipe.artifact.graph  # the sessions the call opened

    def env_allocators(name, **bucket):
        options = step(name, **bucket).native.get_session_options()
        try:
            return options.get_session_config_entry("session.use_env_allocators")
        except RuntimeError:  # not set
            return None

    for entry in svd_pipe.artifact.manifest.graphs:
        if entry.format == "onnx" and entry.name in ("unet_deep", "unet_shallow", "vae_decoder", "image_encoder"):
            unet = entry.name.startswith("unet")
            assert env_allocators(entry.name, **entry.bucket) == ("1" if unet else None)
            # no memory pattern on the shared arena: its block would be a second working memory of the UNet's size
            assert step(entry.name, **entry.bucket).native.get_session_options().enable_mem_pattern is not unet
    own = StableVideoDiffusionPipeline.from_artifacts(svd_cache_artifact, shared_arena=False)
    own.set_progress_bar_config(disable=True)
    own.scheduler = svd_pipe.scheduler
    np.testing.assert_array_equal(_svd_call(own, case, svd_golden, cache_interval=2), shared)
    deep = next(g for g in own.artifact.manifest.graphs if g.name == "unet_deep")
    options = own.artifact.graph("unet_deep", **deep.bucket).native.get_session_options()
    with pytest.raises(RuntimeError):
        options.get_session_config_entry("session.use_env_allocators")


def test_the_cache_graphs_share_the_unet_weights_file(svd_cache_artifact):
    from framegraph.runtime.manifest import Manifest

    manifest = Manifest.load(svd_cache_artifact)
    assert manifest.constants["cache_branch"] == SVD_CACHE_BRANCH
    assert manifest.options["cache_branch"] == SVD_CACHE_BRANCH
    unet_graphs = [g for g in manifest.graphs if g.name.startswith("unet")]
    assert sorted({g.name for g in unet_graphs}) == ["unet", "unet_deep", "unet_shallow"]
    for g in unet_graphs:
        assert g.max_abs_error is not None and g.max_abs_error <= g.tolerance  # each checked against MindSpore
        assert {f.path for f in g.files} == {f"unet/{g.name}_f2_b{g.bucket['batch']}_h32_w32.onnx",
                                             "unet/weights.bin"}
    assert [t.name for t in next(g for g in unet_graphs if g.name == "unet_shallow").inputs][-1] == "deep_features"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "mindspore"])
@pytest.mark.parametrize("name", ["t2v_n2_b1", "t2v_n3_b1"])
def test_t2v_cached_frames_equal_deepcache(t2v_artifact, t2v_golden, deepcache, name, backend):
    from framegraph.runtime import TextToVideoSDPipeline

    cases, arrays = deepcache
    case = cases[name]
    assert case["cache_branch"] == T2V_CACHE_BRANCH
    pipe = TextToVideoSDPipeline.from_artifacts(t2v_artifact, backend=backend)
    pipe.set_progress_bar_config(disable=True)
    frames = _t2v_call(pipe, case, t2v_golden, cache_interval=case["cache_interval"])
    assert np.abs(frames - arrays[f"{name}.frames"]).max() <= _tolerance(case)


def test_low_memory_mode_caches_too(t2v_artifact, t2v_golden, deepcache):
    """One graph open at a time: the deep and shallow graphs take turns, the cached features stay."""
    from framegraph.runtime import TextToVideoSDPipeline

    cases, arrays = deepcache
    case = cases["t2v_n3_b1"]
    pipe = TextToVideoSDPipeline.from_artifacts(t2v_artifact, low_memory=True)
    pipe.set_progress_bar_config(disable=True)
    frames = _t2v_call(pipe, case, t2v_golden, cache_interval=case["cache_interval"])
    assert np.abs(frames - arrays["t2v_n3_b1.frames"]).max() <= _tolerance(case)


def test_cache_interval_without_cache_graphs_is_refused_naming_the_export_flag(svd_artifact):
    from framegraph.runtime import StableVideoDiffusionPipeline
    from framegraph.runtime.params import InvalidRequestError
    from PIL import Image

    pipe = StableVideoDiffusionPipeline.from_artifacts(svd_artifact)
    with pytest.raises(InvalidRequestError, match="--cache-branch") as info:
        pipe(Image.new("RGB", (32, 32)), num_frames=2, cache_interval=2)
    assert info.value.field == "cache_interval"
    assert not pipe.artifact.open_graphs()  # refused before any graph opened


def test_generate_with_cache_interval(svd_cache_artifact, tmp_path):
    out = tmp_path / "cached.mp4"
    result = run_cli("generate", svd_cache_artifact, "--image", FIXTURES / "svd-tiny" / "input.png", "--out", out,
                     "--steps", 3, "--cache-interval", 2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.stat().st_size > 0
    assert "opening unet_deep" in result.stderr and "opening unet_shallow" in result.stderr


@pytest.mark.parametrize("branch, message", [(6, "--cache-branch 6 is out of range"), (-1, "at least 0")])
def test_export_refuses_a_branch_the_unet_lacks_before_loading(svd_tiny, tmp_path, branch, message):
    result = run_cli(svd_tiny, "--out", tmp_path / "out", "--cache-branch", branch, module="framegraph.export.cli")
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "loaded" not in result.stderr and not (tmp_path / "out").exists()


def test_deep_and_shallow_passes_split_the_unet_exactly(ms, svd_tiny, svd_golden):
    """For every branch: the shallow pass on the deep pass's feature of the same inputs is the whole UNet, and the
    feature has the shape cache_split gives (what the export declares)."""
    from framegraph.models.loading import load_component, read_config
    from framegraph.models.unet_common import UNetDeepGraph, UNetShallowGraph
    from framegraph.models.unet_config import cache_split
    from framegraph.models.unet_spatio_temporal_condition import UNetSpatioTemporalConditionModel
    from helpers import pynative

    config = read_config(svd_tiny / "unet")
    net = load_component(UNetSpatioTemporalConditionModel, svd_tiny / "unet")
    inputs = [ms.Tensor(svd_golden[k].astype(np.float32)) for k in
              ("unet.sample", "unet.timestep", "unet.encoder_hidden_states", "unet.added_time_ids")]
    b, f, _, h, w = svd_golden["unet.sample"].shape
    with pynative(ms):
        whole = net(*inputs).asnumpy()
        for branch in range(6):
            out, feature = UNetDeepGraph(net, branch)(*inputs)
            assert feature.shape == (b * f, *cache_split(config, branch, h, w))
            np.testing.assert_array_equal(out.asnumpy(), whole)
            shallow = UNetShallowGraph(net, branch)(*inputs, feature).asnumpy()
            np.testing.assert_allclose(shallow, whole, rtol=0, atol=1e-6)
