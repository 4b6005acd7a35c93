"""Jittable diffusion schedulers: pure steps over a small state pytree, tables precomputed on the host.

`make_scheduler(name, config, num_steps)`: `name` is one of SCHEDULERS (or None: the family named by
the config's `_class_name`), `config` a diffusers scheduler_config dict.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from sdjax.schedulers.base import Scheduler, ScheduleConfig, denoise, per_image_normal
from sdjax.schedulers.ddim import DDIM
from sdjax.schedulers.ddpm import DDPM
from sdjax.schedulers.dpm_solver import DPMSolverPP2M
from sdjax.schedulers.euler import Euler, EulerAncestral
from sdjax.schedulers.heun import Heun
from sdjax.schedulers.lms import LMS
from sdjax.schedulers.pndm import PNDM
from sdjax.schedulers.unipc import UniPC

# name -> (constructor(cfg, num_steps, **options), diffusers class names that mean this family)
SCHEDULERS: dict[str, tuple[Callable[..., Scheduler], tuple[str, ...]]] = {
    "ddim": (DDIM, ("DDIMScheduler",)),
    "ddpm": (DDPM, ("DDPMScheduler",)),
    "pndm": (PNDM, ("PNDMScheduler",)),
    "lms": (LMS, ("LMSDiscreteScheduler",)),
    "euler": (Euler, ("EulerDiscreteScheduler",)),
    "euler_ancestral": (EulerAncestral, ("EulerAncestralDiscreteScheduler",)),
    "heun": (Heun, ("HeunDiscreteScheduler",)),
    "dpmpp_2m": (DPMSolverPP2M, ("DPMSolverMultistepScheduler",)),
    "unipc": (UniPC, ("UniPCMultistepScheduler",)),
}


def scheduler_name(config: dict[str, Any]) -> str:
    """The family of a diffusers scheduler config (its `_class_name`)."""
    cls = config.get("_class_name")
    for name, (_, classes) in SCHEDULERS.items():
        if cls in classes:
            return name
    raise ValueError(f"scheduler_config: _class_name {cls!r} is not a known scheduler; "
                     f"pass one of: {', '.join(SCHEDULERS)}")


# The families whose sigmas use_karras_sigmas respaces (A1111's "Schedule type: Karras"); the others
# (DDIM, DDPM, PNDM, Euler a, as in diffusers) ignore it, so asking them for it is refused.
KARRAS_FAMILIES = ("lms", "euler", "heun", "dpmpp_2m", "unipc")

# scheduler_config keys an option may override (diffusers' from_config(config, **overrides)), e.g.
# use_karras_sigmas=True for "DPM++ 2M Karras": the common ones and those a family reads.
CONFIG_OPTIONS = frozenset({f.name for f in dataclasses.fields(ScheduleConfig)} - {"raw"}) | frozenset({
    "use_exponential_sigmas", "use_beta_sigmas", "final_sigmas_type", "sigma_min", "sigma_max", "solver_order",
    "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "lambda_min_clipped", "variance_type",
    "skip_prk_steps", "disable_corrector", "timestep_type"})


def make_scheduler(name: str | None, config: dict[str, Any], num_steps: int, **options) -> Scheduler:
    """Builds scheduler `name` (default: the config's own family) for `num_steps` steps. `options` are the
    family's own (e.g. eta for DDIM) or scheduler_config overrides (CONFIG_OPTIONS, e.g. use_karras_sigmas)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    name = name or scheduler_name(config)
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    family = SCHEDULERS[name][0]
    own = set(inspect.signature(family.__init__).parameters) - {"self", "cfg", "num_steps"}
    overrides = {k: v for k, v in options.items() if k not in own}
    unknown = sorted(set(overrides) - CONFIG_OPTIONS)
    if unknown:
        raise ValueError(f"scheduler option {unknown[0]!r} is not one of {name}'s ({', '.join(sorted(own)) or 'none'}) "
                         f"nor a scheduler_config key it reads")
    # Keys the config leaves out take the family's own defaults (as diffusers' from_config does),
    # e.g. a PNDM config switched to DDIM gets DDIM's clip_sample=True.
    merged = {**getattr(family, "DEFAULTS", {}), **config, **overrides}
    return family(ScheduleConfig.from_dict(merged), num_steps, **{k: v for k, v in options.items() if k in own})


__all__ = ["KARRAS_FAMILIES", "SCHEDULERS", "Scheduler", "ScheduleConfig", "denoise", "make_scheduler", "per_image_normal",
           "scheduler_name"]
