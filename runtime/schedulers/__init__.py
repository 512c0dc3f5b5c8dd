"""numpy ports of the diffusers (0.42.1) schedulers the framegraph pipelines use, and of AnimateLCM-SVD's.

>>> from framegraph.runtime.schedulers import load_scheduler
>>> scheduler = load_scheduler({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear"})
>>> scheduler.set_timesteps(25)

Configs behave like diffusers' (``from_config``, ``_use_default_values``, leftover keys kept); no torch or
diffusers import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .scheduling_animatelcm_svd import (
    AnimateLCMSVDStochasticIterativeScheduler,
    AnimateLCMSVDStochasticIterativeSchedulerOutput,
)
from .scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput
from .scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from .scheduling_euler_discrete import EulerDiscreteScheduler, EulerDiscreteSchedulerOutput
from .scheduling_utils import FrozenDict, SchedulerMixin, SchedulerOutput, UnsupportedConfigError

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "DDIMScheduler": DDIMScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "AnimateLCMSVDStochasticIterativeScheduler": AnimateLCMSVDStochasticIterativeScheduler,
}


def load_scheduler(config: Mapping | str | os.PathLike, **overrides) -> SchedulerMixin:
    """Build the scheduler named by the config's ``_class_name``.

    ``config`` is a config mapping (e.g. a parsed ``scheduler_config.json`` or another scheduler's ``.config``),
    or a path to a scheduler folder / JSON file. Keyword arguments override config entries.
    """
    if isinstance(config, (str, os.PathLike)):
        config = SchedulerMixin.load_config(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping or a path, got {type(config).__name__}")
    class_name = config.get("_class_name")
    if class_name not in SCHEDULERS:
        raise ValueError(f"Unsupported scheduler `_class_name` {class_name!r}; supported: {sorted(SCHEDULERS)}")
    return SCHEDULERS[class_name].from_config(config, **overrides)


__all__ = [
    "AnimateLCMSVDStochasticIterativeScheduler",
    "AnimateLCMSVDStochasticIterativeSchedulerOutput",
    "DDIMScheduler",
    "DDIMSchedulerOutput",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerDiscreteSchedulerOutput",
    "FrozenDict",
    "SCHEDULERS",
    "SchedulerMixin",
    "SchedulerOutput",
    "UnsupportedConfigError",
    "load_scheduler",
]
