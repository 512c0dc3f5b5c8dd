"""DDIM sampler (https://huggingface.co/papers/2010.02502): numpy port of diffusers' ``DDIMScheduler``.

The default scheduler of ModelScope text-to-video. Integer timesteps; arithmetic on float32 ``alphas_cumprod``
like diffusers.
"""

from __future__ import annotations

import logging

import numpy as np

from .scheduling_utils import (
    SchedulerMixin,
    SchedulerOutputWithX0,
    UnsupportedConfigError,
    broadcast_to_sample,
    check_choice,
    check_num_inference_steps,
    cumprod_f32,
    float_dtype,
    make_betas,
    randn,
    register_to_config,
    rescale_zero_terminal_snr,
    threshold_sample,
)

logger = logging.getLogger(__name__)

DDIMSchedulerOutput = SchedulerOutputWithX0

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class DDIMScheduler(SchedulerMixin):
    """DDIM scheduler; same constructor arguments, defaults and config keys as diffusers 0.42.1."""

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
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))

        self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = np.float32(1.0) - self.betas
        self.alphas_cumprod = cumprod_f32(self.alphas)
        # alpha_bar "before" the first training step, used by the last inference step
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].astype(np.int64)

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """DDIM feeds the sample unscaled."""
        return sample

    def _get_variance(self, timestep: int, prev_timestep: int) -> np.float32:
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = np.float32(1.0) - alpha_prod_t
        beta_prod_t_prev = np.float32(1.0) - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (np.float32(1.0) - alpha_prod_t / alpha_prod_t_prev)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set the inference timesteps (int64, descending). ``device`` is accepted and ignored."""
        cfg = self.config
        n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        self.num_inference_steps = n
        num_train = cfg.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            timesteps = np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            step_ratio = num_train // n
            timesteps = (np.arange(0, n) * step_ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
        else:  # trailing
            step_ratio = num_train / n
            timesteps = np.round(np.arange(num_train, 0, -step_ratio)).astype(np.int64) - 1
        self.timesteps = timesteps

    def step(
        self,
        model_output: np.ndarray,
        timestep: int,
        sample: np.ndarray,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: np.ndarray | None = None,
        return_dict: bool = True,
    ):
        """One DDIM update (formulas 12 and 16 of the paper) from ``timestep`` to the previous inference step."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None'; call `set_timesteps` before `step`.")
        cfg = self.config
        model_output = np.asarray(model_output)
        sample = np.asarray(sample)
        out_dtype = float_dtype(sample, model_output)
        timestep = int(timestep)
        prev_timestep = timestep - cfg.num_train_timesteps // self.num_inference_steps

        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = np.float32(1.0) - alpha_prod_t
        sqrt_alpha, sqrt_beta = np.sqrt(alpha_prod_t), np.sqrt(beta_prod_t)

        if cfg.prediction_type == "epsilon":
            pred_original_sample = (sample - sqrt_beta * model_output) / sqrt_alpha
            pred_epsilon = model_output
        elif cfg.prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - sqrt_alpha * pred_original_sample) / sqrt_beta
        elif cfg.prediction_type == "v_prediction":
            pred_original_sample = sqrt_alpha * sample - sqrt_beta * model_output
            pred_epsilon = sqrt_alpha * model_output + sqrt_beta * sample
        else:
            raise UnsupportedConfigError(f"prediction_type={cfg.prediction_type!r} is not supported")

        if cfg.thresholding:
            pred_original_sample = threshold_sample(
                pred_original_sample, cfg.dynamic_thresholding_ratio, cfg.sample_max_value
            )
        elif cfg.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -cfg.clip_sample_range, cfg.clip_sample_range)

        variance = self._get_variance(timestep, prev_timestep)
        std_dev_t = np.float32(eta) * np.sqrt(variance)
        if use_clipped_model_output:  # re-derive epsilon from the clipped x_0, as in Glide
            pred_epsilon = (sample - sqrt_alpha * pred_original_sample) / sqrt_beta

        direction = np.sqrt(np.float32(1.0) - alpha_prod_t_prev - std_dev_t * std_dev_t) * pred_epsilon
        prev_sample = np.sqrt(alpha_prod_t_prev) * pred_original_sample + direction

        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Pass either `generator` or `variance_noise`, not both.")
            if variance_noise is None:
                variance_noise = randn(model_output.shape, generator, out_dtype)
            prev_sample = prev_sample + std_dev_t * np.asarray(variance_noise)

        prev_sample = prev_sample.astype(out_dtype)
        pred_original_sample = np.asarray(pred_original_sample).astype(out_dtype)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _sqrt_alpha_terms(self, timesteps, like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ac = self.alphas_cumprod.astype(like.dtype)[np.asarray(timesteps, dtype=np.int64).reshape(-1)]
        return broadcast_to_sample(np.sqrt(ac), like), broadcast_to_sample(np.sqrt(1 - ac), like)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """Forward diffusion: ``sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise`` per batch entry."""
        original_samples = np.asarray(original_samples)
        a, b = self._sqrt_alpha_terms(timesteps, original_samples)
        return (a * original_samples + b * np.asarray(noise)).astype(original_samples.dtype)

    def get_velocity(self, sample: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """v-prediction target: ``sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * sample``."""
        sample = np.asarray(sample)
        a, b = self._sqrt_alpha_terms(timesteps, sample)
        return (a * np.asarray(noise) - b * sample).astype(sample.dtype)
