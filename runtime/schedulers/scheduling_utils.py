"""Shared pieces of the numpy schedulers: config handling, noise schedules, outputs.

The config machinery follows diffusers' ``ConfigMixin`` semantics (0.42.1):

* every ``__init__`` argument is recorded in ``scheduler.config`` (a read-only dict with attribute access);
  arguments that were not given are listed under ``_use_default_values``;
* ``from_config(config, **overrides)`` drops the keys listed in ``_use_default_values`` before building, so a
  key absent from the original file takes the default of the class being built (e.g. DPM-Solver's
  ``timestep_spacing="linspace"`` when built from a DDIM config that lacks the key);
* keys the class does not take (``_class_name``, ``skip_prk_steps``, another scheduler's options...) are kept in
  the new config, harmlessly, and ``_class_name`` is updated to the class being built.

Numerics mirror what diffusers computes with float32 CPU tensors (torch accumulates ``cumprod`` in float64).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose behaviour these ports follow

# Options of diffusers schedulers that are not ported here; seeing them in a config is normal (they are kept in
# the config and ignored) and is not worth a warning.
_FOREIGN_SCHEDULER_KEYS = frozenset(
    {"skip_prk_steps", "clip_sample_range", "predict_x0", "solver_p", "disable_corrector", "sigma_data", "rho"}
)

_REGISTRY: dict[str, type] = {}


class UnsupportedConfigError(ValueError, NotImplementedError):
    """A config value the scheduler cannot use (diffusers raises NotImplementedError or ValueError for these)."""


# --------------------------------------------------------------------------------------------------- config


class FrozenDict(dict):
    """A read-only ``dict`` whose keys are also readable as attributes (``config.num_train_timesteps``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no entry {name!r}") from None

    def _read_only(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} is read-only; build a new scheduler with from_config(config, key=value) "
            "or call scheduler.register_to_config(key=value)"
        )

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _read_only
    pop = popitem = setdefault = update = clear = _read_only

    def __reduce__(self):
        return (type(self), (dict(self),))

    def copy(self) -> dict:
        return dict(self)


def register_to_config(init):
    """Decorator for ``__init__``: records every argument (given or defaulted) in ``self.config``.

    Private keyword arguments (leading underscore, e.g. ``_class_name``) are stored in the config and not passed
    on to ``__init__``.
    """
    signature = inspect.signature(init)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    defaults = {name: p.default for name, p in list(signature.parameters.items())[1:] if p.kind in kinds}

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        public = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        private = {k: v for k, v in kwargs.items() if k.startswith("_")}
        values = dict(zip(defaults, args))
        given = set(values) | set(public)
        for name, default in defaults.items():
            values.setdefault(name, public.get(name, default))
        used_defaults = [name for name in defaults if name not in given]
        if used_defaults:
            values["_use_default_values"] = used_defaults
        self.register_to_config(**{**private, **values})
        init(self, *args, **public)

    wrapper.__signature__ = signature
    return wrapper


class SchedulerMixin:
    """Config handling shared by all schedulers (diffusers' ``ConfigMixin`` + ``SchedulerMixin``, local files only)."""

    config_name = SCHEDULER_CONFIG_NAME
    order = 1
    _compatibles: list[str] = []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    # -- config object
    @property
    def config(self) -> FrozenDict:
        return self._internal_dict

    def register_to_config(self, **kwargs) -> None:
        kwargs.pop("kwargs", None)
        previous = self.__dict__.get("_internal_dict", {})
        self._internal_dict = FrozenDict({**previous, **kwargs})

    @classmethod
    def _init_keys(cls) -> set[str]:
        params = inspect.signature(cls.__init__).parameters
        return {name for name in params if name not in ("self", "args", "kwargs")}

    @classmethod
    def extract_init_dict(cls, config_dict: Mapping, **kwargs) -> tuple[dict, dict, dict]:
        """Split a config into (``__init__`` arguments, unused entries, entries to keep in the new config)."""
        used_defaults = set(config_dict.get("_use_default_values", []))
        config_dict = {k: v for k, v in config_dict.items() if k not in used_defaults and k != "_use_default_values"}
        original = dict(config_dict)

        class_name = config_dict.get("_class_name", cls.__name__)
        if not isinstance(class_name, (str, list, tuple)):
            raise ValueError("`_class_name` in a scheduler config must be a string.")

        init_dict = {}
        for key in cls._init_keys():
            if key in kwargs:
                init_dict[key] = kwargs.pop(key)
                config_dict.pop(key, None)
            elif key in config_dict:
                init_dict[key] = config_dict.pop(key)

        leftovers = {k: v for k, v in config_dict.items() if not k.startswith("_")}
        known_elsewhere = set(_FOREIGN_SCHEDULER_KEYS)
        for other in _REGISTRY.values():
            known_elsewhere |= other._init_keys()
        unexpected = {k: v for k, v in leftovers.items() if k not in known_elsewhere}
        if unexpected:
            logger.warning(
                "The config attributes %s were passed to %s, but are not expected and will be ignored.",
                unexpected,
                cls.__name__,
            )
        unused = {**leftovers, **kwargs}
        hidden = {k: v for k, v in original.items() if k not in init_dict}
        return init_dict, unused, hidden

    @classmethod
    def from_config(cls, config: Mapping | str | os.PathLike | None = None, return_unused_kwargs: bool = False,
                    **kwargs):
        """Build the scheduler from a config mapping (another scheduler's ``.config`` works), like diffusers.

        Keyword arguments override config entries. Keys the original config took as defaults (listed in its
        ``_use_default_values``) are dropped, so they take this class's own defaults.
        """
        if config is None:
            raise ValueError("Please provide a config (a mapping, or a scheduler's `.config`) as first argument.")
        if isinstance(config, (str, os.PathLike)):
            config = cls.load_config(config)
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        init_dict, unused, hidden = cls.extract_init_dict(config, **kwargs)
        scheduler = cls(**init_dict)
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        scheduler.register_to_config(**hidden)
        if return_unused_kwargs:
            return scheduler, {**unused, **hidden}
        return scheduler

    @classmethod
    def load_config(cls, path: str | os.PathLike, subfolder: str | None = None) -> dict:
        """Read ``scheduler_config.json`` from a local folder (or a JSON file path)."""
        path = os.fspath(path)
        if subfolder:
            path = os.path.join(path, subfolder)
        if os.path.isdir(path):
            path = os.path.join(path, cls.config_name)
        if not os.path.isfile(path):
            raise OSError(f"No scheduler config found at {path!r} (only local folders/files are supported).")
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OSError(f"The scheduler config at {path!r} is not valid JSON: {e}") from e

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs):
        return cls.from_config(cls.load_config(path, subfolder), return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self) -> str:
        config = dict(self.config)
        config["_class_name"] = type(self).__name__
        config.setdefault("_diffusers_version", DIFFUSERS_VERSION)
        config.pop("_use_default_values", None)
        config = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in config.items()}
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, self.config_name), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    save_pretrained = save_config

    @property
    def compatibles(self) -> list[type]:
        return [_REGISTRY[name] for name in sorted(set(self._compatibles) | {type(self).__name__}) if name in _REGISTRY]

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


# --------------------------------------------------------------------------------------------------- outputs


class SigmaStepsMixin:
    """Where a sigma-table scheduler is in its schedule (diffusers' ``step_index`` and ``begin_index``).

    The first ``step`` (or ``scale_model_input``) starts at ``begin_index`` when a pipeline set one, else at the
    position of its timestep in ``timesteps``. A subclass says what a timestep that is not in the schedule means
    (``_absent_timestep_index``)."""

    _step_index = None
    _begin_index = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def _reset_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    def _absent_timestep_index(self, timestep) -> int:
        raise ValueError(f"timestep {timestep!r} is not in the scheduler's timesteps; pass one of `timesteps`.")

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Index of ``timestep`` in the schedule; the second match if it occurs twice (img2img restarts)."""
        schedule = self.timesteps if schedule_timesteps is None else np.asarray(schedule_timesteps)
        indices = np.flatnonzero(schedule == np.asarray(timestep))
        if len(indices) == 0:
            return self._absent_timestep_index(timestep)
        return int(indices[1] if len(indices) > 1 else indices[0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self.begin_index is None else self._begin_index

    def _noise_indices(self, timesteps: np.ndarray) -> list[int]:
        """The sigma indices ``add_noise`` uses for ``timesteps``, as diffusers picks them: the timesteps' own
        positions before a begin index is set, then the current step (or the begin index before the first)."""
        if self.begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps]
        index = self.step_index if self.step_index is not None else self.begin_index
        return [index] * timesteps.shape[0]


class _Output:
    """Dataclass output that also indexes like diffusers' ``BaseOutput`` (``out[0]``, ``out["prev_sample"]``)."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class SchedulerOutput(_Output):
    prev_sample: np.ndarray


@dataclass
class SchedulerOutputWithX0(_Output):
    prev_sample: np.ndarray
    pred_original_sample: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------- validation


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> int:
    try:
        steps = operator.index(num_inference_steps)
    except TypeError:
        raise ValueError(f"`num_inference_steps` must be an integer, got {num_inference_steps!r}") from None
    if steps < 1:
        raise ValueError(f"`num_inference_steps` must be at least 1, got {steps}")
    if steps > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps`: {steps} cannot be larger than `num_train_timesteps`: {num_train_timesteps}, "
            "the number of timesteps the model was trained with."
        )
    return steps


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UnsupportedConfigError(f"{name}={value!r} is not supported; choose one of {list(choices)}")


# --------------------------------------------------------------------------------------------------- beta schedules


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit: a float32 step, the first half
    counted up from ``start`` and the second half down from ``end``, each value rounded once (fused multiply-add;
    the float64 product of a float32 step and an index is exact)."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps)
    head = np.float64(start32) + step * idx
    tail = np.float64(end32) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, head, tail).astype(np.float32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999,
                        alpha_transform_type: str = "cosine") -> np.ndarray:
    """Betas discretising a continuous ``alpha_bar(t)`` on [0, 1] (Glide's cosine schedule by default)."""
    if alpha_transform_type == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "laplace":
        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    elif alpha_transform_type == "exp":
        def alpha_bar(t):
            return math.exp(t * -12.0)
    else:
        raise ValueError(f"Unsupported alpha_transform_type: {alpha_transform_type}")
    n = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float32)


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None) -> np.ndarray:
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32).copy()
    if beta_schedule == "linear":
        return linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":  # latent diffusion's schedule
        return linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    raise UnsupportedConfigError(
        f"beta_schedule={beta_schedule!r} is not supported; choose one of {list(BETA_SCHEDULES)}"
    )


def cumprod_f32(values: np.ndarray) -> np.ndarray:
    """float32 cumulative product accumulated in float64, as torch does on CPU."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (https://huggingface.co/papers/2305.08891, Algorithm 1), in float32."""
    alphas_bar_sqrt = np.sqrt(cumprod_f32(np.float32(1.0) - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


# --------------------------------------------------------------------------------------------------- sigma helpers


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep(s) of ``sigma`` by interpolating in the ascending ``log_sigmas`` table.

    The log is taken in float64 and then compared and interpolated in the table's dtype (float32), which is what
    diffusers' per-sigma loop computes under numpy 1.x promotion rules; fixing it keeps results (e.g. which integer a
    timestep truncates to) independent of the installed numpy.
    """
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma.astype(np.float64), 1e-10)).reshape(-1).astype(log_sigmas.dtype)
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def sigma_bounds(config: Mapping, in_sigmas: np.ndarray) -> tuple[float, float]:
    """(sigma_min, sigma_max): the config's values if set (even as leftover keys), else the ends of ``in_sigmas``."""
    sigma_min = config.get("sigma_min")
    sigma_max = config.get("sigma_max")
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    return sigma_min, sigma_max


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, descending from sigma_max to sigma_min."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def beta_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, alpha: float = 0.6,
                beta: float = 0.6) -> np.ndarray:
    """Noise levels from the beta distribution's quantiles (https://huggingface.co/papers/2407.12173)."""
    import scipy.stats  # optional dependency, only for use_beta_sigmas

    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, num_inference_steps), alpha, beta)
    return np.array([sigma_min + p * (sigma_max - sigma_min) for p in ppf])


def require_scipy() -> None:
    try:
        import scipy.stats  # noqa: F401
    except ImportError as e:
        raise ImportError("Make sure to install scipy if you want to use beta sigmas.") from e


def check_one_sigma_schedule(config: Mapping) -> None:
    chosen = [k for k in ("use_beta_sigmas", "use_exponential_sigmas", "use_karras_sigmas") if config.get(k)]
    if len(chosen) > 1:
        raise ValueError(f"Only one of {chosen} can be enabled.")
    if config.get("use_beta_sigmas"):
        require_scipy()


# --------------------------------------------------------------------------------------------------- sampling helpers


def randn(shape, generator=None, dtype=np.float32) -> np.ndarray:
    """Standard normal noise from an int seed, a ``numpy.random.Generator``/``RandomState`` or a list of those
    (one per batch entry). An int seeds this one draw (pass the same int at every step and every step gets the
    same noise); pass a Generator to draw fresh noise at each step. Does not reproduce torch's random streams."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}.")
        return np.stack([randn(tuple(shape[1:]), g, dtype) for g in generator])
    if generator is None or isinstance(generator, (int, np.integer)):
        generator = np.random.default_rng(generator)
    if not hasattr(generator, "standard_normal"):
        raise TypeError(f"generator must be an int seed or a numpy random generator, got {type(generator).__name__}")
    return np.asarray(generator.standard_normal(tuple(shape))).astype(dtype)


def threshold_sample(sample: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Imagen, https://huggingface.co/papers/2205.11487), per batch entry."""
    dtype = sample.dtype
    work = sample if dtype in (np.float32, np.float64) else sample.astype(np.float32)
    flat = work.reshape(work.shape[0], -1)
    s = np.quantile(np.abs(flat), ratio, axis=1).astype(flat.dtype)
    s = np.clip(s, 1, max_value)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(sample.shape).astype(dtype)


def float_dtype(*arrays) -> np.dtype:
    """The dtype results are returned in: the inputs' common floating dtype (float32 for non-float inputs)."""
    dtype = np.result_type(*arrays)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float32)


def broadcast_to_sample(values: np.ndarray, sample: np.ndarray) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    return values.reshape(values.shape + (1,) * (sample.ndim - 1))
