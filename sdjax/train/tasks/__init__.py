"""What train.py can train. config.task names one of TASKS; a task is one file here and one line there.

    unet:      latent diffusion on a frozen VAE and text encoder       export: a full diffusers folder
    vae:       AutoencoderKL on images                                 export: vae/ (+ its latent scale)
    clip:      a CLIP dual encoder on image-caption pairs              export: text_encoder/, tokenizer/, clip/
    tokenizer: BPE merges from the captions (no gradient steps)        export: tokenizer files

Each module has `build(config, workdir) -> Task` and `check(config)` (errors raised before any compute).
"""

from __future__ import annotations

from types import ModuleType

import ml_collections

from sdjax.train.tasks import clip, tokenizer, unet, vae
from sdjax.train.tasks.task import Task

TASKS: dict[str, ModuleType] = {"unet": unet, "vae": vae, "clip": clip, "tokenizer": tokenizer}


def task_module(config: ml_collections.ConfigDict) -> ModuleType:
    """The module of config.task, or a ValueError listing the known tasks."""
    if config.task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {config.task!r}")
    return TASKS[config.task]


def build_task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    """The Task config.task names, built from config.model (reads earlier stages' exports)."""
    return task_module(config).build(config, workdir)


__all__ = ["TASKS", "Task", "build_task", "task_module"]
