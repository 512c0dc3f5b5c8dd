"""Euler (Karras et al. 2022, Algorithm 2) sampler: numpy port of diffusers' ``EulerDiscreteScheduler``.

This is Stable Video Diffusion's scheduler (``use_karras_sigmas``, ``v_prediction``,
``timestep_type="continuous"``: the model is fed ``0.25 * log(sigma)``). Sigma arithmetic is float32, as in
diffusers; schedule construction is float64 numpy where diffusers uses numpy.
"""

from __future__ import annotations

import logging

import numpy as np

from .scheduling_utils import (
    SchedulerMixin,
    SchedulerOutputWithX0,
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
    linspace_f32,
    make_betas,
    randn,
    register_to_config,
    rescale_zero_terminal_snr,
    sigma_bounds,
    sigma_to_t,
)

logger = logging.getLogger(__name__)

EulerDiscreteSchedulerOutput = SchedulerOutputWithX0

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")


class EulerDiscreteScheduler(SigmaStepsMixin, SchedulerMixin):
    """Euler scheduler; same constructor arguments, defaults and config keys as diffusers 0.42.1."""

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
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        check_one_sigma_schedule(self.config)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_choice("timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        check_choice("timestep_type", timestep_type, ("discrete", "continuous"))
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))

        self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = np.float32(1.0) - self.betas
        self.alphas_cumprod = cumprod_f32(self.alphas)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2.0**-24  # close to 0 so that the first sigma is finite

        sigmas = self._train_sigmas()[::-1].copy()
        if self._continuous_v():
            self.timesteps = (np.float32(0.25) * np.log(sigmas)).astype(np.float32)
        else:
            self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].astype(np.float32)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])

        self.num_inference_steps = None
        self.is_scale_input_called = False
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._reset_index()

    # -- helpers
    def _train_sigmas(self) -> np.ndarray:
        """sqrt((1 - alpha_bar) / alpha_bar) for training timesteps 0..N-1 (ascending), float32."""
        ac = self.alphas_cumprod
        return np.sqrt((np.float32(1.0) - ac) / ac).astype(np.float32)

    def _continuous_v(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise."""
        max_sigma = np.float32(np.max(self.sigmas))
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma * max_sigma + np.float32(1.0)))

    # -- schedule
    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """Divide the sample by sqrt(sigma^2 + 1) so the model sees unit variance."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sample = np.asarray(sample)
        scaled = sample / np.sqrt(sigma * sigma + np.float32(1.0))
        self.is_scale_input_called = True
        return scaled.astype(sample.dtype) if np.issubdtype(sample.dtype, np.floating) else scaled

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None) -> None:
        """Set the inference schedule from a step count, custom ``timesteps`` or custom ``sigmas`` (with the final
        sigma included). ``device`` is accepted for API compatibility and ignored."""
        cfg = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps` or `sigmas`.")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps` or `sigmas`.")
        if timesteps is not None:
            for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if cfg[flag]:
                    raise ValueError(f"Cannot set `timesteps` with `config.{flag} = True`.")
            if self._continuous_v():
                raise ValueError(
                    "Cannot set `timesteps` with `config.timestep_type = 'continuous'` and "
                    "`config.prediction_type = 'v_prediction'`; pass `sigmas` instead."
                )

        if num_inference_steps is not None:
            num_inference_steps = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        elif timesteps is not None:
            timesteps = np.asarray(timesteps, dtype=np.float32).reshape(-1)
            if timesteps.size < 1:
                raise ValueError("`timesteps` must contain at least one timestep.")
            num_inference_steps = len(timesteps)
        else:
            sigmas = np.asarray(sigmas, dtype=np.float32).reshape(-1)
            if sigmas.size < 2:
                raise ValueError("`sigmas` must contain at least two values (the last one is the final sigma).")
            num_inference_steps = len(sigmas) - 1
        self.num_inference_steps = num_inference_steps

        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        if sigmas is not None:
            timesteps = sigma_to_t(sigmas[:-1], log_sigmas)
        else:
            if timesteps is None:
                timesteps = self._spaced_timesteps(num_inference_steps)
            sigmas = self._sigmas_for(timesteps, train_sigmas, num_inference_steps)
            if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
                timesteps = sigma_to_t(sigmas, log_sigmas)
            if cfg.final_sigmas_type == "sigma_min":
                sigma_last = train_sigmas[0]
            else:
                sigma_last = 0.0
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

        if self._continuous_v():
            with np.errstate(divide="ignore"):
                self.timesteps = (np.float32(0.25) * np.log(sigmas[:-1])).astype(np.float32)
        else:
            self.timesteps = np.asarray(timesteps).astype(np.float32)
        self.sigmas = sigmas
        self._reset_index()

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        cfg = self.config
        num_train = cfg.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, num_train - 1, n, dtype=np.float32)[::-1].copy()
        if cfg.timestep_spacing == "leading":
            step_ratio = num_train // n
            timesteps = (np.arange(0, n) * step_ratio).round()[::-1].astype(np.float32)
            return timesteps + np.float32(cfg.steps_offset)
        step_ratio = num_train / n  # trailing
        return np.arange(num_train, 0, -step_ratio).round().astype(np.float32) - np.float32(1.0)

    def _sigmas_for(self, timesteps: np.ndarray, train_sigmas: np.ndarray, n: int) -> np.ndarray:
        """Inference sigmas (float64, without the final one) for the chosen interpolation / sigma schedule."""
        cfg = self.config
        if cfg.interpolation_type == "linear":
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        else:  # log_linear: like diffusers, n + 1 float32 values from the largest to the smallest training sigma
            log_max, log_min = np.log(train_sigmas[-1]), np.log(train_sigmas[0])
            sigmas = np.exp(linspace_f32(log_max, log_min, n + 1))
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            sigma_min, sigma_max = sigma_bounds(cfg, sigmas)
            if cfg.use_karras_sigmas:
                sigmas = karras_sigmas(sigma_min, sigma_max, n)
            elif cfg.use_exponential_sigmas:
                sigmas = exponential_sigmas(sigma_min, sigma_max, n)
            else:
                sigmas = beta_sigmas(sigma_min, sigma_max, n)
        return sigmas

    # -- stepping
    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator=None,
        return_dict: bool = True,
    ):
        """One Euler step from ``sigmas[i]`` to ``sigmas[i + 1]``; ``s_churn > 0`` adds noise drawn from
        ``generator`` (int seed or numpy generator)."""
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool) or (
            isinstance(timestep, np.ndarray) and np.issubdtype(timestep.dtype, np.integer)
        ):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                "`EulerDiscreteScheduler.step()` is not supported. Pass one of `scheduler.timesteps`."
            )
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None'; call `set_timesteps` before `step`.")
        if not self.is_scale_input_called:
            logger.warning("`scale_model_input` should be called before `step` to ensure correct denoising.")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= len(self.sigmas) - 1:
            raise ValueError("The scheduler has already run all its steps; call `set_timesteps` again.")

        model_output = np.asarray(model_output)
        out_dtype = model_output.dtype if np.issubdtype(model_output.dtype, np.floating) else np.float32
        sample = np.asarray(sample).astype(np.float32)  # diffusers upcasts to float32 here
        sigma = self.sigmas[self.step_index]

        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * np.float32(gamma + 1)
        if gamma > 0:
            eps = randn(model_output.shape, generator, out_dtype) * s_noise
            sample = sample + eps * np.sqrt(sigma_hat * sigma_hat - sigma * sigma)

        prediction_type = self.config.prediction_type
        if prediction_type in ("sample", "original_sample"):
            pred_original_sample = model_output
        elif prediction_type == "epsilon":
            pred_original_sample = sample - sigma_hat * model_output
        elif prediction_type == "v_prediction":
            c_out = -sigma / np.sqrt(sigma * sigma + np.float32(1.0))
            pred_original_sample = model_output * c_out + sample / (sigma * sigma + np.float32(1.0))
        else:
            raise UnsupportedConfigError(f"prediction_type={prediction_type!r} is not supported")

        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[self.step_index + 1] - sigma_hat
        prev_sample = (sample + derivative * dt).astype(out_dtype)
        self._step_index += 1

        if not return_dict:
            return prev_sample, pred_original_sample
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """``original + sigma(t) * noise`` for the given schedule timesteps (one per batch entry)."""
        original_samples = np.asarray(original_samples)
        timesteps = np.atleast_1d(np.asarray(timesteps))
        indices = self._noise_indices(timesteps)
        sigma = broadcast_to_sample(self.sigmas[indices].astype(original_samples.dtype), original_samples)
        return (original_samples + np.asarray(noise) * sigma).astype(original_samples.dtype)
