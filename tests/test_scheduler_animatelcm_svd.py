"""AnimateLCMSVDStochasticIterativeScheduler (numpy) against the published AnimateLCM-SVD-xt scheduler.

Ground truth: tests/fixtures/animatelcm-svd/golden.{json,npz}, made by scripts/make_animatelcm_golden.py running the
published ``animatelcm_svd/animatelcm_scheduler.py`` (G-U-N/AnimateLCM, see golden.json "published") with torch on CPU;
the noise each published ``step`` drew is in the golden and replayed here with ``step(..., noise=...)``.
``scheduler/scheduler_config.json`` is reconstructed (golden.json "config"). Tolerance as in test_schedulers.py:
1e-5 relative to each tensor's scale. No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_close, read_config
from framegraph.runtime.schedulers import (
    SCHEDULERS,
    AnimateLCMSVDStochasticIterativeScheduler,
    EulerDiscreteScheduler,
    load_scheduler,
)

FIXTURES = Path(__file__).parent / "fixtures"
FOLDER = FIXTURES / "animatelcm-svd"
CONFIG = FOLDER / "scheduler" / "scheduler_config.json"
SVD_CONFIG = FIXTURES / "configs" / "svd-xt" / "scheduler" / "scheduler_config.json"
INFO = json.loads((FOLDER / "golden.json").read_text(encoding="utf-8"))
RUNS = [(case, run["key"], run["schedule"]) for case, info in INFO["cases"].items() for run in info["runs"]]


@pytest.fixture(scope="module")
def golden():
    with np.load(FOLDER / "golden.npz") as data:
        return dict(data)


def published_scheduler(**overrides) -> AnimateLCMSVDStochasticIterativeScheduler:
    return AnimateLCMSVDStochasticIterativeScheduler.from_config(read_config(CONFIG), **overrides)


def build(case: str) -> AnimateLCMSVDStochasticIterativeScheduler:
    """The scheduler of a golden case: the published config file, with the case's other arguments."""
    args = INFO["cases"][case]["args"]
    if args == INFO["config"]["args"]:
        return published_scheduler()
    return AnimateLCMSVDStochasticIterativeScheduler(**args)


def run_steps(scheduler, x, model_outputs, noises):
    """scale_model_input / step over the schedule, replaying the published noise; returns (scaled, samples)."""
    scaled, samples = [], []
    for i, t in enumerate(scheduler.timesteps):
        scaled.append(scheduler.scale_model_input(x, t))
        noise = noises[i] if len(noises) else None
        x = scheduler.step(model_outputs[i], t, x, noise=noise).prev_sample
        samples.append(x)
    return scaled, samples


# ------------------------------------------------------------------------------------------------ golden trajectories


@pytest.mark.parametrize("case,key,schedule", RUNS, ids=[f"{c}-{k}" for c, k, _ in RUNS])
def test_golden_trajectory(golden, case, key, schedule):
    scheduler = build(case)
    if isinstance(schedule, int):
        scheduler.set_timesteps(schedule)
    else:
        scheduler.set_timesteps(timesteps=schedule)
    prefix = f"{case}.{key}."
    ref_t = golden[prefix + "timesteps"]
    assert scheduler.timesteps.dtype == ref_t.dtype == np.float64
    assert_close(scheduler.timesteps, ref_t, "timesteps")
    assert scheduler.sigmas.dtype == np.float32
    assert_close(scheduler.sigmas, golden[prefix + "sigmas"], "sigmas")
    assert scheduler.init_noise_sigma == pytest.approx(float(golden[prefix + "init_noise_sigma"]), rel=1e-12)

    n = len(ref_t)
    noises = golden[prefix + "noises"]
    assert len(noises) == (n if n > 1 else 0)  # the published step draws once per step, never for one step
    scaled, samples = run_steps(scheduler, golden[prefix + "x0"], golden[prefix + "model_outputs"], noises)
    for i in range(n):
        assert scaled[i].dtype == samples[i].dtype == np.float32
        assert_close(scaled[i], golden[prefix + "scaled_inputs"][i], f"scaled_inputs[{i}]")
        assert_close(samples[i], golden[prefix + "prev_samples"][i], f"prev_samples[{i}]")


def test_training_grid_before_set_timesteps(golden):
    scheduler = published_scheduler()
    assert scheduler.num_inference_steps is None
    assert_close(scheduler.sigmas, golden["grid.sigmas"], "grid sigmas")
    np.testing.assert_allclose(scheduler.timesteps, golden["grid.timesteps"], rtol=1e-12)  # log(1e-44) at sigma 0


def test_add_noise_matches_published(golden):
    scheduler = published_scheduler()
    scheduler.set_timesteps(4)
    np.testing.assert_array_equal(scheduler.timesteps[[1, 3]], golden["add_noise.timesteps"])
    result = scheduler.add_noise(golden["add_noise.original"], golden["add_noise.noise"], golden["add_noise.timesteps"])
    assert result.dtype == np.float32
    assert_close(result, golden["add_noise.result"], "add_noise")


def test_golden_covers_the_published_sampling():
    """4 steps with the published SVD-XT config (the demo's default) and 1, 2, 8 (its batch script's) are covered."""
    assert {1, 2, 4, 8} <= {s for c, _, s in RUNS if c == "svd_xt"}
    assert INFO["published"]["class"] == AnimateLCMSVDStochasticIterativeScheduler.__name__


# ------------------------------------------------------------------------------------------------ algorithm


def test_last_step_returns_denoised_and_one_step_draws_nothing():
    scheduler = published_scheduler()
    scheduler.set_timesteps(1)
    x = np.full((1, 2, 3), 700.0, np.float32)
    model_output = np.full_like(x, 0.25)
    t = scheduler.timesteps[0]
    scheduler.scale_model_input(x, t)
    out = scheduler.step(model_output, t, x, generator=np.random.default_rng(0))
    sigma = np.float64(scheduler.sigmas[0])  # sigma_data = 1: SVD's v-prediction x0
    expected = x / (sigma**2 + 1) - sigma / np.sqrt(sigma**2 + 1) * model_output
    np.testing.assert_allclose(out.prev_sample, expected, rtol=1e-5)
    np.testing.assert_array_equal(out.prev_sample, out.pred_original_sample)


def test_denoised_equals_euler_x0_for_svd():
    """With sigma_data=1 the consistency x0 is the Euler (v-prediction) scheduler's pred_original_sample."""
    lcm = published_scheduler()
    lcm.set_timesteps(4)
    euler = EulerDiscreteScheduler.from_config(read_config(SVD_CONFIG))
    euler.set_timesteps(sigmas=lcm.sigmas.tolist())
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 4)).astype(np.float32) * np.float32(lcm.sigmas[1])
    v = rng.standard_normal((1, 2, 4)).astype(np.float32)
    for s in (lcm, euler):
        s.set_begin_index(1)
        s.scale_model_input(x, s.timesteps[1])
    np.testing.assert_allclose(lcm.step(v, lcm.timesteps[1], x, noise=np.zeros_like(v)).pred_original_sample,
                               euler.step(v, euler.timesteps[1], x).pred_original_sample, rtol=1e-5, atol=1e-6)


def test_noise_from_numpy_generator_is_reproducible():
    def run(**step_kwargs):
        scheduler = published_scheduler()
        scheduler.set_timesteps(4)
        x = np.ones((1, 2, 3), np.float32) * np.float32(scheduler.init_noise_sigma)
        samples = []
        for t in scheduler.timesteps:
            scheduler.scale_model_input(x, t)
            x = scheduler.step(np.full_like(x, 0.1), t, x, **step_kwargs).prev_sample
            samples.append(x)
        return samples

    a = run(generator=np.random.default_rng(7))
    b = run(generator=np.random.default_rng(7))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = run(generator=np.random.default_rng(8))
    assert not np.allclose(a[0], c[0]) and not np.allclose(a[-1], c[-1])

    # the draw is generator.standard_normal(model_output.shape), one per step
    scheduler = published_scheduler()
    scheduler.set_timesteps(2)
    x = np.zeros((1, 2, 3), np.float32)
    t = scheduler.timesteps[0]
    scheduler.scale_model_input(x, t)
    drawn = scheduler.step(x, t, x, generator=np.random.default_rng(5)).prev_sample
    expected = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32) * scheduler.sigmas[1]
    np.testing.assert_allclose(drawn, expected, rtol=1e-6)


def test_clip_denoised_and_output_dtype():
    scheduler = AnimateLCMSVDStochasticIterativeScheduler()  # class defaults: clip_denoised=True
    scheduler.set_timesteps(3)
    x = np.full((1, 4), 50.0, np.float16)
    t = scheduler.timesteps[-1]
    scheduler.set_begin_index(2)
    scheduler.scale_model_input(x, t)
    out = scheduler.step(np.full((1, 4), -30.0, np.float16), t, x)
    assert out.prev_sample.dtype == np.float16
    assert np.all(np.abs(out.prev_sample) <= 1)


def test_return_dict_false_gives_prev_sample_only():
    scheduler = published_scheduler()
    scheduler.set_timesteps(2)
    x = np.ones((1, 3), np.float32)
    t = scheduler.timesteps[0]
    scheduler.scale_model_input(x, t)
    result = scheduler.step(x, t, x, noise=np.zeros_like(x), return_dict=False)
    assert isinstance(result, tuple) and len(result) == 1


# ------------------------------------------------------------------------------------------------ config and registry


def test_from_config_with_the_published_config():
    config = read_config(CONFIG)
    scheduler = AnimateLCMSVDStochasticIterativeScheduler.from_config(config)
    for key in ("num_train_timesteps", "sigma_min", "sigma_max", "sigma_data", "s_noise", "rho", "clip_denoised"):
        assert scheduler.config[key] == config[key], key
    assert "_use_default_values" not in scheduler.config  # the file sets every argument
    assert scheduler.config["_class_name"] == "AnimateLCMSVDStochasticIterativeScheduler"
    again = AnimateLCMSVDStochasticIterativeScheduler.from_config(scheduler.config)
    assert again.config == scheduler.config
    assert published_scheduler(s_noise=1.01).config.s_noise == 1.01


def test_save_and_reload_round_trip(tmp_path):
    published_scheduler().save_pretrained(tmp_path)
    written = read_config(tmp_path / "scheduler_config.json")
    assert {k: v for k, v in written.items() if not k.startswith("_")} == {
        k: v for k, v in read_config(CONFIG).items() if not k.startswith("_")}
    assert isinstance(load_scheduler(tmp_path), AnimateLCMSVDStochasticIterativeScheduler)


def test_registry_lookup_by_class_name():
    assert SCHEDULERS["AnimateLCMSVDStochasticIterativeScheduler"] is AnimateLCMSVDStochasticIterativeScheduler
    assert isinstance(load_scheduler(read_config(CONFIG)), AnimateLCMSVDStochasticIterativeScheduler)
    assert isinstance(load_scheduler(CONFIG.parent), AnimateLCMSVDStochasticIterativeScheduler)  # a folder works too
    overridden = load_scheduler(CONFIG, sigma_max=80.0)
    assert overridden.init_noise_sigma == pytest.approx((80.0**2 + 1) ** 0.5)


def test_euler_config_keys_are_not_silently_taken():
    """Built from SVD's Euler config, only the shared keys carry over (sigma_min/max); the rest take the defaults."""
    scheduler = AnimateLCMSVDStochasticIterativeScheduler.from_config(read_config(SVD_CONFIG))
    assert scheduler.config.sigma_max == 700.0 and scheduler.config.sigma_min == 0.002
    assert scheduler.config.num_train_timesteps == 1000  # Euler's 1000 training steps: not AnimateLCM's 40


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_train_timesteps=1), "num_train_timesteps"),
    (dict(num_train_timesteps=2.5), "num_train_timesteps"),
    (dict(sigma_min=0.0), "sigma_min"),
    (dict(sigma_min=5.0, sigma_max=1.0), "smaller than"),
    (dict(sigma_data=-1.0), "sigma_data"),
    (dict(rho=0), "rho"),
    (dict(s_noise=-0.5), "s_noise"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnimateLCMSVDStochasticIterativeScheduler(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "Exactly one of"),
    (dict(num_inference_steps=4, timesteps=[30, 20]), "only pass one"),
    (dict(num_inference_steps=41), "cannot be larger"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=2.5), "num_inference_steps"),
    (dict(timesteps=[10, 20]), "descending"),
    (dict(timesteps=[40, 20]), r"\[0, 40\)"),
    (dict(timesteps=[20, -1]), r"\[0, 40\)"),
    (dict(timesteps=[20.5, 3]), "integer"),
    (dict(timesteps=[]), "at least one"),
    (dict(sigmas=[700.0, 1.0, 0.0]), "no custom `sigmas`"),
])
def test_bad_set_timesteps_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        published_scheduler().set_timesteps(**kwargs)


def test_bad_step_arguments():
    scheduler = published_scheduler()
    x = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, np.float64(1.6), x)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.scale_model_input(x, np.float64(1.6))
    scheduler.set_timesteps(2)
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="integer"):
        scheduler.step(x, 0, x)
    with pytest.raises(ValueError, match="not in the scheduler's timesteps"):
        scheduler.step(x, np.float64(0.123), x)
    with pytest.raises(ValueError, match="either `noise` or `generator`"):
        scheduler.step(x, t, x, generator=np.random.default_rng(0), noise=x)
    with pytest.raises(ValueError, match="noise must have"):
        scheduler.step(x, t, x, noise=np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="model_output has shape"):
        scheduler.step(np.zeros((1, 3), np.float32), t, x)
    with pytest.raises(TypeError, match="generator"):
        scheduler.step(x, t, x, generator="seed")
    scheduler.step(x, t, x, noise=x)
    scheduler.step(x, scheduler.timesteps[1], x, noise=x)
    with pytest.raises(ValueError, match="already run all its steps"):
        scheduler.step(x, scheduler.timesteps[1], x, noise=x)


def test_svd_pipeline_takes_the_step_noise_from_its_generator():
    """In the SVD pipeline (the shipped tiny artifact) the scheduler's step noise comes from the call's generator:
    with the same latents and image noise, the same seed gives the same frames and another seed other frames."""
    from PIL import Image

    from framegraph.runtime import StableVideoDiffusionPipeline
    from framegraph.runtime.demo import DEMO_ARTIFACT, DEMO_IMAGE

    pipe = StableVideoDiffusionPipeline.from_artifacts(DEMO_ARTIFACT, verify=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = AnimateLCMSVDStochasticIterativeScheduler.from_config(CONFIG)
    rng = np.random.default_rng(0)
    fixed = {"latents": rng.standard_normal((1, 2, 4, 16, 16)).astype(np.float32),
             "image_noise": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}
    image = Image.open(DEMO_IMAGE).convert("RGB")
    a, b, c = (pipe(image, num_frames=2, num_inference_steps=2, generator=seed, output_type="np", **fixed).frames
               for seed in (1, 1, 2))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
