"""numpy schedulers (framegraph.runtime.schedulers) against diffusers 0.42.1.

Tolerance used throughout for values computed by diffusers: elementwise
    |actual - reference| <= 1e-5 * |reference| + 1e-5 * max(1, max|reference|)
i.e. ``np.testing.assert_allclose(rtol=1e-5, atol=1e-5 * max(1, max|ref|))`` -- 1e-5 relative to the tensor's scale,
the scheduler tolerance of tests/fixtures/README.md. Integer timesteps must match exactly.

Ground truth: tests/fixtures/schedulers/golden.{json,npz} (see its "how"), and DIFFUSERS_REFERENCE below: final
samples of short trajectories for options the golden does not cover, recorded from diffusers 0.42.1 + torch 2.13.0
(CPU, float32) with the deterministic inputs of ``_wave``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_close, read_config
from framegraph.runtime.schedulers import (
    SCHEDULERS,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FrozenDict,
    load_scheduler,
)

FIXTURES = Path(__file__).parent / "fixtures"
SVD_CONFIG = FIXTURES / "configs" / "svd-xt" / "scheduler" / "scheduler_config.json"
T2V_CONFIG = FIXTURES / "configs" / "text-to-video-ms-1.7b" / "scheduler" / "scheduler_config.json"
GOLDEN_INFO = json.loads((FIXTURES / "schedulers" / "golden.json").read_text(encoding="utf-8"))
GOLDEN_CASES = [(case, n) for case, info in GOLDEN_INFO["cases"].items() for n in info["steps"]]
ALL_CLASSES = [EulerDiscreteScheduler, DDIMScheduler, DPMSolverMultistepScheduler]


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURES / "schedulers" / "golden.npz") as data:
        return dict(data)


def build_golden_scheduler(case: str):
    """The scheduler as golden.json's "how" says, built from the published scheduler_config.json files."""
    if case == "euler_svd":
        return EulerDiscreteScheduler.from_config(read_config(SVD_CONFIG))
    ddim = DDIMScheduler.from_config(read_config(T2V_CONFIG))
    if case == "ddim_t2v":
        return ddim
    assert case == "dpmsolver_t2v"
    return DPMSolverMultistepScheduler.from_config(ddim.config)


# ------------------------------------------------------------------------------------------------ golden trajectories


@pytest.mark.parametrize("case,steps", GOLDEN_CASES, ids=[f"{c}-n{n}" for c, n in GOLDEN_CASES])
def test_golden_trajectory(golden, case, steps):
    scheduler = build_golden_scheduler(case)
    assert type(scheduler).__name__ == GOLDEN_INFO["cases"][case]["class"]
    scheduler.set_timesteps(steps)
    key = f"{case}.n{steps}."

    ref_t = golden[key + "timesteps"]
    assert scheduler.timesteps.dtype == ref_t.dtype
    if np.issubdtype(ref_t.dtype, np.integer):
        np.testing.assert_array_equal(scheduler.timesteps, ref_t)
    else:
        assert_close(scheduler.timesteps, ref_t, "timesteps")
    if key + "sigmas" in golden:
        assert scheduler.sigmas.dtype == np.float32
        assert_close(scheduler.sigmas, golden[key + "sigmas"], "sigmas")
    assert_close(scheduler.init_noise_sigma, golden[key + "init_noise_sigma"], "init_noise_sigma")

    x = golden[key + "x0"]
    model_outputs = golden[key + "model_outputs"]
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(x, t)
        assert scaled.dtype == np.float32 and scaled.shape == x.shape
        assert_close(scaled, golden[key + "scaled_inputs"][i], f"scaled_inputs[{i}]")
        x = scheduler.step(model_outputs[i], t, x).prev_sample
        assert x.dtype == np.float32
        assert_close(x, golden[key + "prev_samples"][i], f"prev_samples[{i}]")


def test_golden_covers_every_case(golden):
    for case, steps in GOLDEN_CASES:
        for field in ("timesteps", "init_noise_sigma", "x0", "model_outputs", "scaled_inputs", "prev_samples"):
            assert f"{case}.n{steps}.{field}" in golden


# ------------------------------------------------------------------------------------------------ more diffusers paths

DIFFUSERS_REFERENCE = {
    'dpm_pp_o3_karras': dict(
        cls='DPMSolverMultistepScheduler', steps=8, options={},
        config=dict(solver_order=3, use_karras_sigmas=True),
        timesteps=[999, 890, 746, 549, 299, 90, 12, 0],
        final=[-18.1502934, 6.10336637, 21.4155769, 5.35391998, -18.5512486, -15.2787876, 10.3771248, 20.830534],
        sigmas=[14.6146469, 7.90294456, 4.0277462, 1.91036284, 0.828871727, 0.321121693, 0.107199393, 0.0291675348,
            0],
    ),
    'dpm_pp_o3_no_lof': dict(
        cls='DPMSolverMultistepScheduler', steps=20, options={},
        config=dict(solver_order=3, lower_order_final=False, prediction_type='sample'),
        timesteps=[999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250, 200, 150, 100,
            50],
        final=[0.986771941, 0.107753649, -0.929123998, -0.604832828, 0.605539858, 0.928795218, -0.108636595,
            -0.986915529],
        sigmas=[14.6146469, 10.9042397, 8.3028059, 6.4429574, 5.08776522, 4.08173084, 3.3210845, 2.73547029,
            2.27646399, 1.91025162, 1.6182797, 1.3716687, 1.16439164, 0.987108946, 0.832753181, 0.69579947,
            0.57166636, 0.456075311, 0.343931824, 0.225582555, 0],
    ),
    'dpm_noise_heun_v': dict(
        cls='DPMSolverMultistepScheduler', steps=6, options={},
        config=dict(algorithm_type='dpmsolver', solver_type='heun', final_sigmas_type='sigma_min',
                    prediction_type='v_prediction'),
        timesteps=[999, 832, 666, 500, 333, 166],
        final=[-0.194829881, 1.26716292, 0.872759163, -0.800238967, -1.30088532, 0.104268372, 1.35666847,
            0.62154603],
        sigmas=[14.6146469, 5.93470383, 2.9183085, 1.6182797, 0.932358384, 0.492409676, 0.0291675348],
    ),
    'dpm_noise_o3_eps': dict(
        cls='DPMSolverMultistepScheduler', steps=9, options={},
        config=dict(algorithm_type='dpmsolver', solver_order=3, final_sigmas_type='sigma_min'),
        timesteps=[999, 888, 777, 666, 555, 444, 333, 222, 111],
        final=[-17.8834438, 5.75904894, 20.9645176, 5.45692158, -18.0450783, -15.1109982, 9.96073246, 20.4399624],
        sigmas=[14.6146469, 7.83988476, 4.60917616, 2.9183085, 1.95016241, 1.34492838, 0.932358384, 0.624977291,
            0.368658513, 0.0291675348],
    ),
    'dpm_sde_pp_mid': dict(
        cls='DPMSolverMultistepScheduler', steps=5, options={'noise': True},
        config=dict(algorithm_type='sde-dpmsolver++'),
        timesteps=[999, 799, 599, 400, 200],
        final=[-20.0296345, -3.52938509, 18.1414127, 13.2350006, -11.0607243, -19.1524601, 0.814199924, 19.5880604],
        sigmas=[14.6146469, 5.08776522, 2.27646399, 1.16439164, 0.57166636, 0],
    ),
    'dpm_pp_trailing_sigma_min': dict(
        cls='DPMSolverMultistepScheduler', steps=12, options={},
        config=dict(timestep_spacing='trailing', final_sigmas_type='sigma_min', euler_at_final=True),
        timesteps=[999, 916, 832, 749, 666, 582, 499, 416, 332, 249, 166, 82],
        final=[-17.1993294, 7.75053263, 21.3458538, 3.66944861, -19.3827076, -14.0391579, 11.8717937, 20.3905315],
        sigmas=[14.6146469, 9.08900928, 5.93470383, 4.08173084, 2.9183085, 2.14291, 1.61288702, 1.22706354,
            0.929214895, 0.693205416, 0.492409676, 0.30289349, 0.0291675348],
    ),
    'ddim_v_trailing_eta': dict(
        cls='DDIMScheduler', steps=10, options={'noise': True, 'eta': 0.7},
        config=dict(prediction_type='v_prediction', timestep_spacing='trailing', clip_sample=True,
                    clip_sample_range=1.5),
        timesteps=[999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
        final=[-0.378806084, -0.265226632, 0.236910373, 0.391973138, -0.0272055715, -0.406528205, -0.19028604,
            0.304725677],
    ),
    'ddim_linspace_sample': dict(
        cls='DDIMScheduler', steps=7, options={},
        config=dict(prediction_type='sample', timestep_spacing='linspace', set_alpha_to_one=True),
        timesteps=[999, 832, 666, 500, 333, 166, 0],
        final=[-0.88345468, 0.215119988, 0.998543322, 0.319098353, -0.82782644, -0.761983573, 0.420167029,
            0.986771941],
    ),
    'euler_eps_linspace': dict(
        cls='EulerDiscreteScheduler', steps=10, options={},
        config=dict(),
        timesteps=[999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
        final=[-18.4915009, 4.68323803, 20.9970207, 6.55011988, -17.4927235, -15.9086847, 8.98161316, 20.7138271],
        sigmas=[14.6146469, 7.83988476, 4.60917616, 2.9183085, 1.95016241, 1.34492838, 0.932358384, 0.624977291,
            0.368658513, 0.0291675348, 0],
    ),
    'euler_karras_discrete_trailing': dict(
        cls='EulerDiscreteScheduler', steps=6, options={},
        config=dict(use_karras_sigmas=True, timestep_spacing='trailing', final_sigmas_type='sigma_min'),
        timesteps=[999, 900.180298, 774.043457, 606.433472, 388.274811, 166],
        final=[-19.1632996, 6.17391634, 22.4663334, 5.84551954, -19.3389931, -16.1918335, 10.6763992, 21.9036789],
        sigmas=[14.6146469, 8.35453033, 4.54941654, 2.33814287, 1.12041819, 0.492409676, 0.0291675348],
    ),
    'euler_sample_leading': dict(
        cls='EulerDiscreteScheduler', steps=5, options={},
        config=dict(prediction_type='sample', timestep_spacing='leading', steps_offset=1),
        timesteps=[801, 601, 401, 201, 1],
        final=[-0.611857891, -0.925814688, 0.116549194, 0.98816824, 0.412118495, -0.767685831, -0.822828591,
            0.327474445],
        sigmas=[5.13443327, 2.29285479, 1.16821647, 0.574050784, 0.041314479, 0],
    ),
}


def _wave(i: int, phase: float) -> np.ndarray:
    """Deterministic (1, 2, 2, 2) float32 inputs; the same function made DIFFUSERS_REFERENCE."""
    k = np.arange(8, dtype=np.float64)
    return np.sin(1.3 * k + 0.7 * i + phase).reshape(1, 2, 2, 2).astype(np.float32)


@pytest.mark.parametrize("name", sorted(DIFFUSERS_REFERENCE))
def test_diffusers_reference_trajectory(name):
    ref = DIFFUSERS_REFERENCE[name]
    config = {k: v for k, v in read_config(T2V_CONFIG).items() if k != "_class_name"}
    scheduler = SCHEDULERS[ref["cls"]].from_config(config, **ref["config"])
    scheduler.set_timesteps(ref["steps"])
    ref_timesteps = np.array(ref["timesteps"], dtype=scheduler.timesteps.dtype)
    if np.issubdtype(ref_timesteps.dtype, np.integer):
        np.testing.assert_array_equal(scheduler.timesteps, ref_timesteps)
    else:  # Euler's fractional timesteps
        assert_close(scheduler.timesteps, ref_timesteps, "timesteps")
    if "sigmas" in ref:
        assert_close(scheduler.sigmas, ref["sigmas"], "sigmas")
    x = _wave(-1, 0.0) * np.float32(scheduler.init_noise_sigma)
    for i, t in enumerate(scheduler.timesteps):
        kwargs = {}
        if ref["options"].get("noise"):
            kwargs["variance_noise"] = _wave(i, 2.0)
        if "eta" in ref["options"]:
            kwargs["eta"] = ref["options"]["eta"]
        scheduler.scale_model_input(x, t)
        x = scheduler.step(_wave(i, 1.0), t, x, **kwargs).prev_sample
    assert_close(x.ravel(), ref["final"], "final sample")


# ------------------------------------------------------------------------------------------------ exactness properties


def _vp_alpha_sigma(sigma):
    """(alpha_t, sigma_t) of the variance-preserving process for a k-diffusion sigma."""
    alpha = 1.0 / np.sqrt(np.float64(sigma) ** 2 + 1.0)
    return alpha, np.float64(sigma) * alpha


def _consistent_output(prediction_type, x0, eps, alpha, sigma):
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return alpha * eps - sigma * x0  # v_prediction


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(
    "options",
    [
        dict(algorithm_type="dpmsolver++", solver_order=1),
        dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"),
        dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="heun"),
        dict(algorithm_type="dpmsolver++", solver_order=3, lower_order_final=False),
        dict(algorithm_type="dpmsolver++", solver_order=3, use_karras_sigmas=True),
        dict(algorithm_type="dpmsolver", solver_order=1, final_sigmas_type="sigma_min"),
        dict(algorithm_type="dpmsolver", solver_order=2, solver_type="heun", final_sigmas_type="sigma_min"),
        dict(algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False),
    ],
    ids=lambda o: "-".join(f"{v}" for v in o.values()),
)
def test_dpm_solver_exact_on_consistent_model(options, prediction_type):
    """With a model that knows x0 and the noise, every order/algorithm stays on alpha_t * x0 + sigma_t * eps."""
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type, **options
    )
    scheduler.set_timesteps(12)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    eps = rng.standard_normal((2, 3, 4)).astype(np.float32)
    alpha, sigma = _vp_alpha_sigma(scheduler.sigmas[0])
    x = (alpha * x0 + sigma * eps).astype(np.float32)
    for i, t in enumerate(scheduler.timesteps):
        alpha, sigma = _vp_alpha_sigma(scheduler.sigmas[i])
        model_output = _consistent_output(prediction_type, x0, eps, alpha, sigma).astype(np.float32)
        x = scheduler.step(model_output, t, x).prev_sample
        alpha, sigma = _vp_alpha_sigma(scheduler.sigmas[i + 1])
        np.testing.assert_allclose(x, alpha * x0 + sigma * eps, rtol=1e-4, atol=1e-4, err_msg=f"step {i}")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_exact_on_consistent_model(prediction_type):
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(10)
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal((2, 2, 8)), rng.standard_normal((2, 2, 8))
    a = scheduler.alphas_cumprod[scheduler.timesteps[0]]
    x = (np.sqrt(a) * x0 + np.sqrt(1 - a) * eps).astype(np.float32)
    for t in scheduler.timesteps:
        a = np.float64(scheduler.alphas_cumprod[t])
        model_output = _consistent_output(prediction_type, x0, eps, np.sqrt(a), np.sqrt(1 - a)).astype(np.float32)
        x = scheduler.step(model_output, t, x).prev_sample
    np.testing.assert_allclose(x, x0, rtol=1e-4, atol=1e-4)  # set_alpha_to_one: the last step lands on x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_euler_exact_on_consistent_model(prediction_type):
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type=prediction_type, use_karras_sigmas=True)
    scheduler.set_timesteps(9)
    rng = np.random.default_rng(2)
    x0, eps = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    x = (x0 + scheduler.sigmas[0] * eps).astype(np.float32)
    for i, t in enumerate(scheduler.timesteps):
        scheduler.scale_model_input(x, t)
        alpha, sigma = _vp_alpha_sigma(scheduler.sigmas[i])
        model_output = _consistent_output(prediction_type, x0, eps, alpha, sigma).astype(np.float32)
        x = scheduler.step(model_output, t, x).prev_sample
        np.testing.assert_allclose(x, x0 + np.float64(scheduler.sigmas[i + 1]) * eps, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ Euler specifics


def test_euler_custom_sigmas_reproduce_golden(golden):
    """Passing the n=7 schedule as custom sigmas gives the same timesteps and trajectory."""
    scheduler = EulerDiscreteScheduler.from_config(read_config(SVD_CONFIG))
    sigmas = golden["euler_svd.n7.sigmas"]
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    assert scheduler.num_inference_steps == 7
    np.testing.assert_array_equal(scheduler.sigmas, sigmas)
    assert_close(scheduler.timesteps, golden["euler_svd.n7.timesteps"], "timesteps")  # 0.25 * log(sigma)
    x = golden["euler_svd.n7.x0"]
    for i, t in enumerate(scheduler.timesteps):
        scheduler.scale_model_input(x, t)
        x = scheduler.step(golden["euler_svd.n7.model_outputs"][i], t, x).prev_sample
    assert_close(x, golden["euler_svd.n7.prev_samples"][-1], "final sample")


def test_euler_custom_sigmas_discrete_timesteps():
    """Discrete timesteps come from interpolating log-sigma in the training table, as in diffusers."""
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    train_sigmas = np.sqrt((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod)
    scheduler.set_timesteps(sigmas=[train_sigmas[999], train_sigmas[500], train_sigmas[20], 0.0])
    np.testing.assert_allclose(scheduler.timesteps, [999, 500, 20], atol=1e-3)
    assert scheduler.sigmas.dtype == np.float32 and scheduler.sigmas[-1] == 0
    assert scheduler.init_noise_sigma == pytest.approx(float(np.float32(train_sigmas[999])), rel=1e-6)


def test_euler_custom_schedule_argument_errors():
    svd = EulerDiscreteScheduler.from_config(read_config(SVD_CONFIG))
    with pytest.raises(ValueError, match="Only one of"):
        svd.set_timesteps(timesteps=[3, 2], sigmas=[2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="Can only pass one of"):
        svd.set_timesteps(5, sigmas=[2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="Must pass"):
        svd.set_timesteps()
    with pytest.raises(ValueError, match="use_karras_sigmas"):  # SVD's config uses Karras sigmas
        svd.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="at least two"):
        svd.set_timesteps(sigmas=[1.0])


def test_euler_rejects_integer_timestep():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    x = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="integer"):
        scheduler.step(x, 999, x)


def test_euler_churn_noise_from_numpy_generator():
    def run(**step_kwargs):
        scheduler = EulerDiscreteScheduler()
        scheduler.set_timesteps(5)
        x = np.ones((2, 3), np.float32)
        for t in scheduler.timesteps:
            x = scheduler.step(np.full_like(x, 0.1), t, scheduler.scale_model_input(x, t), **step_kwargs).prev_sample
        return x

    deterministic = run()
    np.testing.assert_array_equal(run(generator=123), deterministic)  # s_churn=0 draws no noise
    noisy = run(s_churn=1.0, generator=np.random.default_rng(7))  # a Generator draws fresh noise each step
    np.testing.assert_array_equal(run(s_churn=1.0, generator=np.random.default_rng(7)), noisy)
    assert not np.allclose(noisy, deterministic)
    seeded = run(s_churn=1.0, generator=7)  # an int seeds each call's noise on its own: reproducible too
    np.testing.assert_array_equal(run(s_churn=1.0, generator=7), seeded)
    assert not np.allclose(seeded, deterministic)


def test_euler_begin_index_and_step_index():
    scheduler = EulerDiscreteScheduler.from_config(read_config(SVD_CONFIG))
    scheduler.set_timesteps(6)
    assert scheduler.step_index is None and scheduler.begin_index is None
    scheduler.set_begin_index(2)
    x = np.ones((1, 2), np.float32)
    scheduler.scale_model_input(x, scheduler.timesteps[2])
    assert scheduler.step_index == 2
    scheduler.step(x, scheduler.timesteps[2], x)
    assert scheduler.step_index == 3



@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_add_noise_picks_sigma_as_diffusers_does(cls):
    """Before a begin index: each timestep's own sigma; after set_begin_index: that index until the first step,
    then the current step's (diffusers' img2img order: add_noise is called before the loop)."""
    scheduler = cls()
    scheduler.set_timesteps(6)
    x = np.ones((2, 3), np.float32)
    noise = np.full((2, 3), 0.5, np.float32)
    t = scheduler.timesteps

    def expected(indices):
        sigma = scheduler.sigmas[indices].astype(np.float64)
        if cls is EulerDiscreteScheduler:  # x + sigma * noise
            return 1.0 + 0.5 * sigma
        alpha_t = 1.0 / np.sqrt(1.0 + sigma ** 2)  # DPM-Solver: alpha_t * x + sigma_t * noise
        return alpha_t + 0.5 * sigma * alpha_t

    def check(timesteps, indices):
        np.testing.assert_allclose(scheduler.add_noise(x, noise, np.array(timesteps))[:, 0], expected(indices),
                                   rtol=1e-5)

    check([t[1], t[4]], [1, 4])
    scheduler.set_begin_index(3)
    check([t[0], t[0]], [3, 3])
    scheduler.step(np.zeros_like(x), t[3], x)
    check([t[0], t[0]], [4, 4])


def test_timestep_outside_the_schedule():
    """diffusers' DPM-Solver starts an unknown timestep at the schedule's last step; Euler cannot place it."""
    dpm = DPMSolverMultistepScheduler()
    dpm.set_timesteps(5)
    assert dpm.index_for_timestep(1234) == len(dpm.timesteps) - 1
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(5)
    with pytest.raises(ValueError, match="not in the scheduler's timesteps"):
        euler.index_for_timestep(1234.5)
    repeated = np.array([9, 7, 7, 3])
    assert dpm.index_for_timestep(7, repeated) == euler.index_for_timestep(7, repeated) == 2


# ------------------------------------------------------------------------------------------------ config handling


def test_dpm_from_ddim_config_takes_its_own_defaults():
    ddim = DDIMScheduler.from_config(read_config(T2V_CONFIG))
    assert "timestep_spacing" in ddim.config["_use_default_values"]
    dpm = DPMSolverMultistepScheduler.from_config(ddim.config)
    dpm.set_timesteps(4)
    np.testing.assert_array_equal(dpm.timesteps, [999, 749, 500, 250])
    assert dpm.timesteps.dtype == np.int64
    assert dpm.config.timestep_spacing == "linspace"
    assert dpm.config["_class_name"] == "DPMSolverMultistepScheduler"
    assert dpm.config.beta_schedule == "scaled_linear" and dpm.config.steps_offset == 1
    assert dpm.config.skip_prk_steps is True and dpm.config.clip_sample is False  # leftovers kept, harmless

    ddim.set_timesteps(4)
    np.testing.assert_array_equal(ddim.timesteps, [751, 501, 251, 1])
    back = DDIMScheduler.from_config(dpm.config)  # and back: DDIM's own default again
    assert back.config.timestep_spacing == "leading"
    overridden = DPMSolverMultistepScheduler.from_config(ddim.config, timestep_spacing="leading")
    assert overridden.config.timestep_spacing == "leading"


def test_from_config_fills_defaults_and_ignores_private_keys():
    config = read_config(SVD_CONFIG)
    euler = EulerDiscreteScheduler.from_config(config)
    assert euler.config.final_sigmas_type == "zero" and euler.config.rescale_betas_zero_snr is False
    assert euler.config.sigma_max == 700.0 and euler.config.use_karras_sigmas is True
    assert euler.config["_diffusers_version"] == "0.24.0.dev0"
    assert EulerDiscreteScheduler.from_config(euler.config).config == euler.config
    _, unused = EulerDiscreteScheduler.from_config(config, return_unused_kwargs=True, foo=1)
    assert unused["foo"] == 1 and unused["skip_prk_steps"] is True


def test_config_is_read_only_with_attribute_access():
    config = DDIMScheduler().config
    assert isinstance(config, FrozenDict) and isinstance(config, dict)
    assert config.num_train_timesteps == config["num_train_timesteps"] == 1000
    with pytest.raises(TypeError):
        config["num_train_timesteps"] = 10
    with pytest.raises(TypeError):
        config.update(num_train_timesteps=10)
    with pytest.raises(AttributeError):
        _ = config.not_a_key


def test_load_scheduler_picks_class_by_name():
    assert set(SCHEDULERS) == {"EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                               "AnimateLCMSVDStochasticIterativeScheduler"}
    assert isinstance(load_scheduler(read_config(SVD_CONFIG)), EulerDiscreteScheduler)
    assert isinstance(load_scheduler(read_config(T2V_CONFIG)), DDIMScheduler)
    assert isinstance(load_scheduler(T2V_CONFIG.parent), DDIMScheduler)  # a folder works too
    dpm = load_scheduler({**read_config(T2V_CONFIG), "_class_name": "DPMSolverMultistepScheduler"})
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.timestep_spacing == "linspace"  # absent from the file: DPM-Solver's default
    with pytest.raises(ValueError, match="PNDMScheduler"):
        load_scheduler({"_class_name": "PNDMScheduler"})
    with pytest.raises(ValueError):
        load_scheduler({"beta_schedule": "linear"})


def test_save_and_reload_round_trip(tmp_path):
    dpm = DPMSolverMultistepScheduler.from_config(read_config(T2V_CONFIG), solver_order=3)
    dpm.save_pretrained(tmp_path)
    again = DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert again.config.solver_order == 3 and again.config.beta_schedule == "scaled_linear"
    assert read_config(tmp_path / "scheduler_config.json")["_class_name"] == "DPMSolverMultistepScheduler"


# ------------------------------------------------------------------------------------------------ API details


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_return_dict_false_gives_tuple(cls):
    def make():
        scheduler = cls.from_config(read_config(T2V_CONFIG))
        scheduler.set_timesteps(3)
        return scheduler

    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 2, 4)
    model_output = np.cos(x)
    a, b = make(), make()
    t = a.timesteps[0]
    out = a.step(model_output, t, a.scale_model_input(x, t))
    tup = b.step(model_output, t, b.scale_model_input(x, t), return_dict=False)
    assert isinstance(tup, tuple)
    np.testing.assert_array_equal(tup[0], out.prev_sample)
    np.testing.assert_array_equal(out[0], out.prev_sample)
    if cls is DPMSolverMultistepScheduler:
        assert len(tup) == 1
    else:
        assert len(tup) == 2
        np.testing.assert_array_equal(tup[1], out.pred_original_sample)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_order_and_len(cls):
    scheduler = cls()
    assert scheduler.order == 1 and len(scheduler) == 1000


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("steps", [0, -2, 1001, 2.5, "10"])
def test_bad_num_inference_steps(cls, steps):
    scheduler = cls.from_config(read_config(T2V_CONFIG))
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(steps)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_unknown_prediction_type_and_beta_schedule(cls):
    with pytest.raises(ValueError, match="prediction_type"):
        cls(prediction_type="noise")
    with pytest.raises(ValueError, match="beta_schedule"):
        cls(beta_schedule="cubic")
    with pytest.raises(NotImplementedError):  # what diffusers raises for an unknown beta schedule
        cls(beta_schedule="cubic")
    with pytest.raises(ValueError, match="timestep_spacing"):
        cls(timestep_spacing="uniform")


@pytest.mark.parametrize("cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler],
                         ids=lambda c: c.__name__)
def test_step_before_set_timesteps(cls):
    scheduler = cls()
    x = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, np.float32(999.0), x)


def test_dpm_solver_option_errors():
    with pytest.raises(ValueError, match="sigma_min"):
        DPMSolverMultistepScheduler(algorithm_type="dpmsolver")  # noise prediction needs a non-zero final sigma
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="algorithm_type"):
        DPMSolverMultistepScheduler(algorithm_type="unipc")
    with pytest.raises(ValueError, match="Only one of"):
        DPMSolverMultistepScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)


def test_ddim_eta_noise():
    def run(**kwargs):
        scheduler = DDIMScheduler.from_config(read_config(T2V_CONFIG))
        scheduler.set_timesteps(4)
        x = np.ones((1, 4), np.float32)
        for t in scheduler.timesteps:
            x = scheduler.step(np.full_like(x, 0.3), t, x, **kwargs).prev_sample
        return x

    np.testing.assert_array_equal(run(eta=0.5, generator=3), run(eta=0.5, generator=3))
    rngs = [np.random.default_rng(3), np.random.default_rng(3)]
    np.testing.assert_array_equal(run(eta=0.5, generator=rngs[0]), run(eta=0.5, generator=rngs[1]))
    np.testing.assert_array_equal(run(eta=0.0, generator=3), run())  # eta=0: deterministic DDIM
    assert not np.allclose(run(eta=1.0, generator=3), run())
    with pytest.raises(ValueError, match="generator"):
        run(eta=0.5, generator=1, variance_noise=np.zeros((1, 4), np.float32))


def test_output_dtype_follows_model_output():
    for cls in ALL_CLASSES:
        scheduler = cls.from_config(read_config(T2V_CONFIG))
        scheduler.set_timesteps(2)
        x = np.ones((1, 3), np.float16)
        t = scheduler.timesteps[0]
        out = scheduler.step(np.zeros_like(x), t, scheduler.scale_model_input(x, t)).prev_sample
        assert out.dtype == np.float16, cls.__name__
