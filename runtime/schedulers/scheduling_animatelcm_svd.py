"""AnimateLCM-SVD-xt's consistency sampler: numpy port of ``AnimateLCMSVDStochasticIterativeScheduler``.

The published scheduler is ``animatelcm_svd/animatelcm_scheduler.py`` of github.com/G-U-N/AnimateLCM (commit
413037e49f1c46ac19156d49890043c5704dc4da, unchanged at f873122), a variant of diffusers'
``CMStochasticIterativeScheduler`` (multistep consistency sampling, Song et al. 2023, Algorithm 1). Same constructor
arguments, defaults and config keys, so ``from_config`` takes its ``scheduler_config.json``. The published code builds
it for SVD-XT with ``num_train_timesteps=40, sigma_min=0.002, sigma_max=700.0, sigma_data=1.0, s_noise=1.0, rho=7,
clip_denoised=False``; the class defaults (80.0, 0.5, ``clip_denoised=True``) are the image consistency models'.

The algorithm, in three pieces:

* sigma schedule: a Karras (rho) ramp over ``num_train_timesteps`` points from ``sigma_max`` down to ``sigma_min``;
  ``set_timesteps(n)`` takes grid points 0, r, 2r, ... (``r = num_train_timesteps // n``), so the last sigma is not
  ``sigma_min`` unless ``n == num_train_timesteps``; a final 0 is appended. Sigmas are float32; ``timesteps`` are the
  float64 ``0.25 * log(sigma)`` (SVD's c_noise, computed from the float64 sigmas), which the UNet is fed.
* preconditioning (EDM, ``sigma_data``): ``scale_model_input`` divides by ``sqrt(sigma^2 + sigma_data^2)`` (c_in);
  ``step`` forms ``denoised = c_skip * sample + c_out * model_output`` with ``c_skip = sigma_data^2 / (sigma^2 +
  sigma_data^2)`` and ``c_out = -sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)`` (with ``sigma_data=1`` this is
  SVD's v-prediction x0, the same as the Euler scheduler's), clamped to [-1, 1] if ``clip_denoised``.
* step rule: ``prev_sample = denoised + s_noise * z * sigma_next`` with ``z ~ N(0, I)``: the consistency model jumps to
  x0 and re-noises to the next sigma (no ODE step); the last step returns ``denoised`` (``sigma_next = 0``).

Random draws: like the published code, ``step`` draws one standard-normal array of ``model_output.shape`` at every
step, the last one included (where it is multiplied by 0), whenever the schedule has more than one step, and none for a
one-step schedule. The published code draws it with torch (``randn_tensor(model_output.shape, dtype=model_output.dtype,
generator=generator)``; its pipeline passes no generator, so torch's global generator on the latents' device), which
numpy cannot reproduce: to replay a torch run, pass each step's tensor as ``noise=``. With ``generator=`` (a numpy
``Generator``, a list of them, one per batch entry, or an int seed, as in the other schedulers) the draw is
``generator.standard_normal(model_output.shape)`` cast to float32.

Deviations, all for clearer errors: ``step`` and ``scale_model_input`` before ``set_timesteps`` raise (the published
code would silently use the 40-point training grid); custom ``timesteps`` must be integers in
``[0, num_train_timesteps)``; ``step(..., return_dict=True)`` also returns ``pred_original_sample`` (``denoised``);
``return_dict=False`` returns ``(prev_sample,)`` as published.
"""

from __future__ import annotations

import logging
import operator

import numpy as np

from .scheduling_utils import (
    SchedulerMixin,
    SchedulerOutputWithX0,
    SigmaStepsMixin,
    broadcast_to_sample,
    check_num_inference_steps,
    randn,
    register_to_config,
)

logger = logging.getLogger(__name__)

AnimateLCMSVDStochasticIterativeSchedulerOutput = SchedulerOutputWithX0


def _check_positive(name: str, value) -> None:
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}")


class AnimateLCMSVDStochasticIterativeScheduler(SigmaStepsMixin, SchedulerMixin):
    """Multistep consistency sampler of AnimateLCM-SVD-xt; same constructor arguments, defaults and config keys as
    the published class."""

    _compatibles: list[str] = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 40,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        s_noise: float = 1.0,
        rho: float = 7.0,
        clip_denoised: bool = True,
    ):
        try:
            num_train_timesteps = operator.index(num_train_timesteps)
        except TypeError:
            raise ValueError(f"`num_train_timesteps` must be an integer, got {num_train_timesteps!r}") from None
        if num_train_timesteps < 2:
            raise ValueError(f"`num_train_timesteps` must be at least 2 (the grid's ends), got {num_train_timesteps}")
        for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("sigma_data", sigma_data),
                            ("rho", rho)):
            _check_positive(name, value)
        if not sigma_min < sigma_max:
            raise ValueError(f"`sigma_min` ({sigma_min}) must be smaller than `sigma_max` ({sigma_max})")
        if not isinstance(s_noise, (int, float, np.integer, np.floating)) or isinstance(s_noise, bool) or s_noise < 0:
            raise ValueError(f"`s_noise` must be a non-negative number, got {s_noise!r}")

        # Before set_timesteps, the published scheduler holds the whole training grid (float64, final 0 included).
        sigmas = np.concatenate([self._convert_to_karras(np.linspace(0, 1, num_train_timesteps)), [0.0]])
        self.sigmas = sigmas
        self.timesteps = self.sigma_to_t(sigmas)
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.is_scale_input_called = False
        self._reset_index()

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: ``sqrt(sigma_max^2 + 1)``, as published (not ``sigma_data``)."""
        return (self.config.sigma_max**2 + 1) ** 0.5

    # -- schedule
    def _convert_to_karras(self, ramp: np.ndarray) -> np.ndarray:
        """Karras et al. (2022) sigmas at ``ramp`` in [0, 1] (0: ``sigma_max``, 1: ``sigma_min``), float64."""
        cfg = self.config
        min_inv_rho = cfg.sigma_min ** (1 / cfg.rho)
        max_inv_rho = cfg.sigma_max ** (1 / cfg.rho)
        return (max_inv_rho + np.asarray(ramp, dtype=np.float64) * (min_inv_rho - max_inv_rho)) ** cfg.rho

    @staticmethod
    def sigma_to_t(sigmas) -> np.ndarray:
        """The UNet's timestep for ``sigmas``: ``0.25 * log(sigma)`` in float64 (a tiny offset keeps 0 finite)."""
        return 0.25 * np.log(np.asarray(sigmas, dtype=np.float64) + 1e-44)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None) -> None:
        """Set the schedule from a step count, or from custom ``timesteps``: strictly descending integer indices into
        the ``num_train_timesteps``-point grid (as published, the list is read in reverse: its last entry picks the
        first sigma). ``device`` is accepted for API compatibility and ignored."""
        cfg = self.config
        num_train = cfg.num_train_timesteps
        if sigmas is not None:
            raise ValueError(
                f"{type(self).__name__} takes no custom `sigmas`: its sigmas are points of the {num_train}-point "
                "Karras grid. Pass `num_inference_steps`, or `timesteps` (grid indices)."
            )
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Exactly one of `num_inference_steps` or `timesteps` must be supplied.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps`.")

        if timesteps is not None:
            grid = np.asarray(timesteps).reshape(-1)
            if grid.size < 1:
                raise ValueError("`timesteps` must contain at least one grid index.")
            if not (np.issubdtype(grid.dtype, np.integer) or
                    (np.issubdtype(grid.dtype, np.floating) and np.all(grid == np.round(grid)))):
                raise ValueError(f"`timesteps` must be integer indices into the {num_train}-point grid, got {grid}")
            grid = grid.astype(np.int64)
            if np.any(np.diff(grid) >= 0):
                raise ValueError(f"`timesteps` must be in descending order, got {grid.tolist()}")
            if grid[0] >= num_train or grid[-1] < 0:
                raise ValueError(f"`timesteps` must lie in [0, {num_train}) (num_train_timesteps), got {grid.tolist()}")
            self.custom_timesteps = True
        else:
            num_inference_steps = check_num_inference_steps(num_inference_steps, num_train)
            step_ratio = num_train // num_inference_steps
            grid = (np.arange(0, num_inference_steps) * step_ratio)[::-1].astype(np.int64)
            self.custom_timesteps = False
        self.num_inference_steps = len(grid)

        # As in openai/consistency_models: grid index k -> Karras sigma at ramp k / (N - 1).
        sigmas = self._convert_to_karras(grid[::-1] / (num_train - 1))
        self.timesteps = self.sigma_to_t(sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self._reset_index()

    # -- preconditioning
    def get_scalings_for_boundary_condition(self, sigma) -> tuple[np.float32, np.float32]:
        """(c_skip, c_out) of the consistency parameterisation at ``sigma``, float32."""
        sigma = np.float32(sigma)
        sd = np.float32(self.config.sigma_data)
        var = sigma * sigma + sd * sd
        c_skip = (sd * sd) / var
        c_out = (-sigma * sd) / np.sqrt(var)
        return np.float32(c_skip), np.float32(c_out)

    def _check_ready(self, method: str) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"Number of inference steps is 'None'; call `set_timesteps` before `{method}`.")

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """Divide the sample by ``sqrt(sigma^2 + sigma_data^2)`` (c_in)."""
        self._check_ready("scale_model_input")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sd = np.float32(self.config.sigma_data)
        sample = np.asarray(sample)
        scaled = sample / np.sqrt(sigma * sigma + sd * sd)
        self.is_scale_input_called = True
        return scaled.astype(sample.dtype) if np.issubdtype(sample.dtype, np.floating) else scaled

    # -- stepping
    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        generator=None,
        noise: np.ndarray | None = None,
        return_dict: bool = True,
    ):
        """Jump to ``denoised`` and re-noise it to the next sigma. The noise is ``noise`` if given, else drawn from
        ``generator`` (see the module docstring for how the draws map to the published torch code's)."""
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool) or (
            isinstance(timestep, np.ndarray) and np.issubdtype(timestep.dtype, np.integer)
        ):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                f"`{type(self).__name__}.step()` is not supported. Pass one of `scheduler.timesteps`."
            )
        self._check_ready("step")
        if noise is not None and generator is not None:
            raise ValueError("Pass either `noise` or `generator` to `step`, not both.")
        model_output = np.asarray(model_output)
        sample = np.asarray(sample)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {model_output.shape} but sample has shape {sample.shape}")
        if noise is not None and np.shape(noise) != model_output.shape:
            raise ValueError(f"noise must have the model output's shape {model_output.shape}, got {np.shape(noise)}")
        if not self.is_scale_input_called:
            logger.warning("`scale_model_input` should be called before `step` to ensure correct denoising.")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= len(self.sigmas) - 1:
            raise ValueError("The scheduler has already run all its steps; call `set_timesteps` again.")

        out_dtype = model_output.dtype if np.issubdtype(model_output.dtype, np.floating) else np.float32
        sigma = self.sigmas[self.step_index]
        sigma_next = self.sigmas[self.step_index + 1]  # the published `else` branch (sigmas[-1]) is the same value

        c_skip, c_out = self.get_scalings_for_boundary_condition(sigma)
        denoised = c_out * model_output.astype(np.float32) + c_skip * sample.astype(np.float32)
        if self.config.clip_denoised:
            denoised = np.clip(denoised, -1, 1)

        if len(self.timesteps) > 1:  # a one-step schedule draws nothing
            if noise is None:
                noise = randn(model_output.shape, generator, np.float32)
            z = np.asarray(noise, dtype=np.float32) * np.float32(self.config.s_noise)
        else:
            z = np.zeros(model_output.shape, np.float32)
        sigma_hat = np.clip(sigma_next, np.float32(0), np.float32(self.config.sigma_max))
        prev_sample = (denoised + z * sigma_hat).astype(out_dtype)
        self._step_index += 1

        if not return_dict:
            return (prev_sample,)
        return AnimateLCMSVDStochasticIterativeSchedulerOutput(prev_sample=prev_sample,
                                                               pred_original_sample=denoised.astype(out_dtype))

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """``original + sigma(t) * noise`` for the given schedule timesteps (one per batch entry)."""
        original_samples = np.asarray(original_samples)
        indices = self._noise_indices(np.atleast_1d(np.asarray(timesteps)))
        sigma = broadcast_to_sample(np.asarray(self.sigmas)[indices].astype(original_samples.dtype), original_samples)
        return (original_samples + np.asarray(noise) * sigma).astype(original_samples.dtype)
