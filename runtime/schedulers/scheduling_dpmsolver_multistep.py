"""Multistep DPM-Solver / DPM-Solver++ (https://huggingface.co/papers/2206.00927, 2211.01095): numpy port of
diffusers' ``DPMSolverMultistepScheduler``.

Orders 1-3, ``dpmsolver++`` (data prediction, the default), ``dpmsolver`` (noise prediction) and their SDE
variants (noise from an int seed / numpy generator, or ``variance_noise``). Sigma arithmetic is float32 like
diffusers; schedule construction is float64 numpy where diffusers uses numpy.
"""

from __future__ import annotations

import logging

import numpy as np

from .scheduling_utils import (
    SchedulerMixin,
    SchedulerOutput,
    SigmaStepsMixin,
    UnsupportedConfigError,
    beta_sigmas,
    broadcast_to_sample,
    check_choice,
    check_num_inference_steps,
    check_one_sigma_schedule,
    cumprod_f32,
    exponential_sigmas,
    karras_sigmas,
    make_betas,
    randn,
    register_to_config,
    rescale_zero_terminal_snr,
    sigma_bounds,
    sigma_to_t,
    threshold_sample,
)

logger = logging.getLogger(__name__)

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
_ONE = np.float32(1.0)


class DPMSolverMultistepScheduler(SigmaStepsMixin, SchedulerMixin):
    """DPM-Solver multistep scheduler; same constructor arguments, defaults and config keys as diffusers 0.42.1."""

    _compatibles = ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        check_one_sigma_schedule(self.config)
        if algorithm_type == "deis":  # diffusers maps these to their closest DPM-Solver settings
            self.register_to_config(algorithm_type="dpmsolver++")
        elif algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            logger.warning("algorithm_type %r is deprecated in diffusers; prefer dpmsolver++ / sde-dpmsolver++",
                           algorithm_type)
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        check_choice("algorithm_type", self.config.algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", self.config.solver_type, ("midpoint", "heun"))
        check_choice("solver_order", solver_order, (1, 2, 3))
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        # (checks the argument as given, like diffusers: "deis" also needs final_sigmas_type="sigma_min")
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and final_sigmas_type == "zero":
            raise ValueError(
                f"`final_sigmas_type` {final_sigmas_type} is not supported for `algorithm_type` "
                f"{algorithm_type}. Please choose `sigma_min` instead."
            )

        self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = _ONE - self.betas
        self.alphas_cumprod = cumprod_f32(self.alphas)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2.0**-24  # close to 0 so that the first sigma is finite

        # VP schedule: x_t = alpha_t * x_0 + sigma_t * noise, lambda_t = log(alpha_t / sigma_t)
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(_ONE - self.alphas_cumprod)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)
        self.sigmas = np.sqrt((_ONE - self.alphas_cumprod) / self.alphas_cumprod)

        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0
        self._reset_index()

    # -- indices
    def _absent_timestep_index(self, timestep) -> int:
        return len(self.timesteps) - 1  # diffusers' DPM-Solver steps from the end of the schedule

    # -- schedule
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu: float | None = None,
                      timesteps=None) -> None:
        """Set the inference schedule from a step count or custom integer ``timesteps``. ``mu`` sets
        ``flow_shift = exp(mu)`` (dynamic shifting). ``device`` is accepted and ignored."""
        cfg = self.config
        if mu is not None:
            if not (cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"):
                raise ValueError("`mu` needs `use_dynamic_shifting=True` and `time_shift_type='exponential'`.")
            self.register_to_config(flow_shift=float(np.exp(mu)))
            cfg = self.config
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps`.")
        if timesteps is not None:
            for flag in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"):
                if cfg[flag]:
                    raise ValueError(f"Cannot use `timesteps` with `config.{flag} = True`.")
            timesteps = np.asarray(timesteps).astype(np.int64).reshape(-1)
            if timesteps.size < 1:
                raise ValueError("`timesteps` must contain at least one timestep.")
            num_inference_steps = len(timesteps)
        else:
            num_inference_steps = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
            timesteps = self._spaced_timesteps(num_inference_steps)

        train_sigmas = np.sqrt((_ONE - self.alphas_cumprod) / self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        descending = train_sigmas[::-1].copy()
        if cfg.use_karras_sigmas:
            sigmas = karras_sigmas(*sigma_bounds(cfg, descending), num_inference_steps)
            timesteps = self._round(sigma_to_t(sigmas, log_sigmas))
        elif cfg.use_lu_lambdas:
            # Lu et al.'s uniform-logSNR steps: linear in log(sigma) between the largest and smallest sigma
            log_max, log_min = np.log(descending[0]).item(), np.log(descending[-1]).item()
            ramp = np.linspace(0, 1, num_inference_steps)
            sigmas = np.exp(log_max + ramp * (log_min - log_max))
            timesteps = self._round(sigma_to_t(sigmas, log_sigmas))
        elif cfg.use_exponential_sigmas:
            sigmas = exponential_sigmas(*sigma_bounds(cfg, descending), num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        elif cfg.use_beta_sigmas:
            sigmas = beta_sigmas(*sigma_bounds(cfg, descending), num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        elif cfg.use_flow_sigmas:
            alphas = np.linspace(1, 1 / cfg.num_train_timesteps, num_inference_steps + 1)
            sigmas = 1.0 - alphas
            sigmas = np.flip(cfg.flow_shift * sigmas / (1 + (cfg.flow_shift - 1) * sigmas))[:-1].copy()
            timesteps = sigmas * cfg.num_train_timesteps
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)

        sigma_last = train_sigmas[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._reset_index()

    def _round(self, timesteps: np.ndarray) -> np.ndarray:
        return timesteps if self.config.beta_schedule == "squaredcos_cap_v2" else timesteps.round()

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        cfg = self.config
        # Clip the smallest lambda(t) for numerical stability (critical for the cosine schedule).
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], cfg.lambda_min_clipped, side="left"))
        last_timestep = cfg.num_train_timesteps - clipped_idx
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if cfg.timestep_spacing == "leading":
            step_ratio = last_timestep // (n + 1)
            return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
        step_ratio = cfg.num_train_timesteps / n  # trailing
        return np.arange(last_timestep, 0, -step_ratio).round().astype(np.int64) - 1

    # -- model output conversion
    def _sigma_to_alpha_sigma_t(self, sigma):
        if self.config.use_flow_sigmas:
            return _ONE - sigma, sigma
        alpha_t = _ONE / np.sqrt(sigma * sigma + _ONE)
        return alpha_t, sigma * alpha_t

    def _lambda(self, sigma):
        alpha, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        with np.errstate(divide="ignore"):
            return alpha, sigma_t, np.log(alpha) - np.log(sigma_t)

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Turn the model output into what the solver integrates: x_0 (``dpmsolver++``) or noise (``dpmsolver``)."""
        cfg = self.config
        learned = cfg.variance_type in ("learned", "learned_range")
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index])
        if cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            if cfg.prediction_type == "epsilon":
                if learned:
                    model_output = model_output[:, :3]
                x0_pred = (sample - sigma_t * model_output) / alpha_t
            elif cfg.prediction_type == "sample":
                x0_pred = model_output
            elif cfg.prediction_type == "v_prediction":
                x0_pred = alpha_t * sample - sigma_t * model_output
            elif cfg.prediction_type == "flow_prediction":
                x0_pred = sample - self.sigmas[self.step_index] * model_output
            else:
                raise UnsupportedConfigError(f"prediction_type={cfg.prediction_type!r} is not supported")
            if cfg.thresholding:
                x0_pred = threshold_sample(x0_pred, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            return x0_pred

        if cfg.prediction_type == "epsilon":
            epsilon = model_output[:, :3] if learned else model_output
        elif cfg.prediction_type == "sample":
            epsilon = (sample - alpha_t * model_output) / sigma_t
        elif cfg.prediction_type == "v_prediction":
            epsilon = alpha_t * model_output + sigma_t * sample
        else:
            raise UnsupportedConfigError(
                f"prediction_type={cfg.prediction_type!r} is not supported with algorithm_type={cfg.algorithm_type!r}"
            )
        if cfg.thresholding:
            x0_pred = threshold_sample((sample - sigma_t * epsilon) / alpha_t, cfg.dynamic_thresholding_ratio,
                                       cfg.sample_max_value)
            epsilon = (sample - alpha_t * x0_pred) / sigma_t
        return epsilon

    # -- solver updates (sample is float32; sigmas[i] -> sigmas[i + 1])
    def dpm_solver_first_order_update(self, model_output, sample, noise=None):
        """First-order step (equivalent to DDIM)."""
        i = self.step_index
        alpha_t, sigma_t, lambda_t = self._lambda(self.sigmas[i + 1])
        alpha_s, sigma_s, lambda_s = self._lambda(self.sigmas[i])
        h = lambda_t - lambda_s
        algo = self.config.algorithm_type
        if algo == "dpmsolver++":
            return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - _ONE)) * model_output
        if algo == "dpmsolver":
            return (alpha_t / alpha_s) * sample - (sigma_t * (np.exp(h) - _ONE)) * model_output
        if algo == "sde-dpmsolver++":
            return ((sigma_t / sigma_s * np.exp(-h)) * sample
                    + (alpha_t * (_ONE - np.exp(-2.0 * h))) * model_output
                    + sigma_t * np.sqrt(_ONE - np.exp(-2.0 * h)) * noise)
        return ((alpha_t / alpha_s) * sample  # sde-dpmsolver
                - 2.0 * (sigma_t * (np.exp(h) - _ONE)) * model_output
                + sigma_t * np.sqrt(np.exp(2.0 * h) - _ONE) * noise)

    def multistep_dpm_solver_second_order_update(self, model_output_list, sample, noise=None):
        """Second-order multistep step using the last two converted model outputs."""
        i = self.step_index
        alpha_t, sigma_t, lambda_t = self._lambda(self.sigmas[i + 1])
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(self.sigmas[i])
        _, _, lambda_s1 = self._lambda(self.sigmas[i - 1])
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (_ONE / r0) * (m0 - m1)
        algo, midpoint = self.config.algorithm_type, self.config.solver_type == "midpoint"
        if algo == "dpmsolver++":
            first = (sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - _ONE)) * d0
            if midpoint:
                return first - 0.5 * (alpha_t * (np.exp(-h) - _ONE)) * d1
            return first + (alpha_t * ((np.exp(-h) - _ONE) / h + _ONE)) * d1
        if algo == "dpmsolver":
            first = (alpha_t / alpha_s0) * sample - (sigma_t * (np.exp(h) - _ONE)) * d0
            if midpoint:
                return first - 0.5 * (sigma_t * (np.exp(h) - _ONE)) * d1
            return first - (sigma_t * ((np.exp(h) - _ONE) / h - _ONE)) * d1
        if algo == "sde-dpmsolver++":
            decay = _ONE - np.exp(-2.0 * h)
            first = (sigma_t / sigma_s0 * np.exp(-h)) * sample + (alpha_t * decay) * d0
            tail = sigma_t * np.sqrt(_ONE - np.exp(-2.0 * h)) * noise
            if midpoint:
                return first + 0.5 * (alpha_t * decay) * d1 + tail
            return first + (alpha_t * (decay / (-2.0 * h) + _ONE)) * d1 + tail
        first = (alpha_t / alpha_s0) * sample - 2.0 * (sigma_t * (np.exp(h) - _ONE)) * d0  # sde-dpmsolver
        tail = sigma_t * np.sqrt(np.exp(2.0 * h) - _ONE) * noise
        if midpoint:
            return first - (sigma_t * (np.exp(h) - _ONE)) * d1 + tail
        return first - 2.0 * (sigma_t * ((np.exp(h) - _ONE) / h - _ONE)) * d1 + tail

    def multistep_dpm_solver_third_order_update(self, model_output_list, sample, noise=None):
        """Third-order multistep step using the last three converted model outputs."""
        i = self.step_index
        alpha_t, sigma_t, lambda_t = self._lambda(self.sigmas[i + 1])
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(self.sigmas[i])
        _, _, lambda_s1 = self._lambda(self.sigmas[i - 1])
        _, _, lambda_s2 = self._lambda(self.sigmas[i - 2])
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (_ONE / r0) * (m0 - m1), (_ONE / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (_ONE / (r0 + r1)) * (d1_0 - d1_1)
        algo = self.config.algorithm_type
        if algo == "dpmsolver++":
            return ((sigma_t / sigma_s0) * sample
                    - (alpha_t * (np.exp(-h) - _ONE)) * m0
                    + (alpha_t * ((np.exp(-h) - _ONE) / h + _ONE)) * d1
                    - (alpha_t * ((np.exp(-h) - _ONE + h) / (h * h) - 0.5)) * d2)
        if algo == "dpmsolver":
            return ((alpha_t / alpha_s0) * sample
                    - (sigma_t * (np.exp(h) - _ONE)) * m0
                    - (sigma_t * ((np.exp(h) - _ONE) / h - _ONE)) * d1
                    - (sigma_t * ((np.exp(h) - _ONE - h) / (h * h) - 0.5)) * d2)
        if algo == "sde-dpmsolver++":
            decay = _ONE - np.exp(-2.0 * h)
            return ((sigma_t / sigma_s0 * np.exp(-h)) * sample
                    + (alpha_t * decay) * m0
                    + (alpha_t * (decay / (-2.0 * h) + _ONE)) * d1
                    + (alpha_t * ((decay - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5)) * d2
                    + sigma_t * np.sqrt(_ONE - np.exp(-2.0 * h)) * noise)
        raise UnsupportedConfigError("solver_order=3 is not available for algorithm_type='sde-dpmsolver' "
                                     "(diffusers has no third-order update for it either)")

    # -- stepping
    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None,
             variance_noise: np.ndarray | None = None, return_dict: bool = True):
        """One multistep DPM-Solver step; returns ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None'; call `set_timesteps` before `step`.")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= len(self.timesteps):
            raise ValueError("The scheduler has already run all its steps; call `set_timesteps` again.")
        cfg = self.config
        n = len(self.timesteps)
        last = self.step_index == n - 1
        lower_order_final = last and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        lower_order_second = self.step_index == n - 2 and cfg.lower_order_final and n < 15

        model_output = np.asarray(model_output)
        out_dtype = model_output.dtype if np.issubdtype(model_output.dtype, np.floating) else np.float32
        converted = self.convert_model_output(model_output, sample=np.asarray(sample))
        self.model_outputs = self.model_outputs[1:] + [converted]
        sample = np.asarray(sample).astype(np.float32)  # diffusers upcasts to float32 here

        noise = None
        if cfg.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            if variance_noise is None:
                noise = randn(model_output.shape, generator, np.float32)
            else:
                noise = np.asarray(variance_noise).astype(np.float32)

        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self.dpm_solver_first_order_update(converted, sample=sample, noise=noise)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample=sample, noise=noise)
        else:
            prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample=sample, noise=noise)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1

        prev_sample = np.asarray(prev_sample).astype(out_dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def scale_model_input(self, sample: np.ndarray, *args, **kwargs) -> np.ndarray:
        """DPM-Solver feeds the sample unscaled."""
        return sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """``alpha_t * x0 + sigma_t * noise`` at the given schedule timesteps (one per batch entry)."""
        original_samples = np.asarray(original_samples)
        timesteps = np.atleast_1d(np.asarray(timesteps))
        indices = self._noise_indices(timesteps)
        sigma = broadcast_to_sample(self.sigmas[indices].astype(original_samples.dtype), original_samples)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return (alpha_t * original_samples + sigma_t * np.asarray(noise)).astype(original_samples.dtype)
