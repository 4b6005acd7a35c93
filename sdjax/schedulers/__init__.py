"""Jittable diffusion schedulers: pure steps over a small state pytree, tables precomputed on the host.

`make_scheduler(name, config, num_steps)`: `name` is one of SCHEDULERS (or None: the family named by
the config's `_class_name`), `config` a diffusers scheduler_config dict.
"""

from __future__ import annotations

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


def make_scheduler(name: str | None, config: dict[str, Any], num_steps: int, **options) -> Scheduler:
    """Builds scheduler `name` (default: the config's own family) for `num_steps` steps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    name = name or scheduler_name(config)
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    family = SCHEDULERS[name][0]
    # Keys the config leaves out take the family's own defaults (as diffusers' from_config does),
    # e.g. a PNDM config switched to DDIM gets DDIM's clip_sample=True.
    merged = {**getattr(family, "DEFAULTS", {}), **config}
    return family(ScheduleConfig.from_dict(merged), num_steps, **options)


__all__ = ["SCHEDULERS", "Scheduler", "ScheduleConfig", "denoise", "make_scheduler", "per_image_normal",
           "scheduler_name"]
