"""Drives our scheduler loop and diffusers' PyTorch scheduler with the same stand-in model and noise."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import torch

from sdjax.schedulers import denoise, make_scheduler, per_image_normal

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def stand_in_model(x, t):
    """A deterministic, smooth, timestep-dependent 'denoiser' (same numbers for both sides: it is JAX)."""
    return jnp.tanh(0.5 * x) * (0.5 + jnp.asarray(t, jnp.float32) / 2000.0) + 0.05 * jnp.sin(x)


def run_both(ref_cls, config: dict, num_steps: int, name: str, step_kwargs: dict | None = None,
             options: dict | None = None, seed: int = 0, start: int = 0):
    """Returns (ours, reference) final samples (numpy, float32) from the same initial noise.

    start > 0 begins both loops at that loop index (img2img; the reference via set_begin_index).

    Stochastic reference steps draw noise through `randn_tensor` in the scheduler's module; it is
    patched to return our per-image noise for that step, so both sides see identical noise.
    """
    shape = (2, 8, 8, 4)
    keys = jax.random.split(jax.random.key(seed), shape[0])
    noise0 = np.asarray(per_image_normal(jax.random.split(jax.random.key(seed + 100), shape[0]), shape[1:]))

    ours_sched = make_scheduler(name, config, num_steps, **(options or {}))
    ours = denoise(ours_sched, stand_in_model, jnp.asarray(noise0 * ours_sched.init_noise_sigma), keys, start=start)

    ref = ref_cls.from_config(config)
    ref.set_timesteps(num_steps)
    if start and hasattr(ref, "set_begin_index"):  # as diffusers' img2img pipelines do
        ref.set_begin_index(start)
    np.testing.assert_allclose(np.asarray(ours_sched.timesteps, np.float64), ref.timesteps.numpy(), rtol=1e-6)
    module = importlib.import_module(ref_cls.__module__)
    step_noise = {"i": 0}
    original = getattr(module, "randn_tensor", None)
    if original is not None:
        module.randn_tensor = lambda shape, **kw: torch.from_numpy(np.array(per_image_normal(
            jax.vmap(lambda k: jax.random.fold_in(k, step_noise["i"]))(keys), tuple(shape[1:]))))
    try:
        x = torch.from_numpy(noise0.copy()) * ref.init_noise_sigma
        for i, t in enumerate(ref.timesteps[start:], start):
            step_noise["i"] = i
            model_in = ref.scale_model_input(x, t)
            out = torch.from_numpy(np.array(stand_in_model(jnp.asarray(model_in.numpy()), float(t))))
            x = ref.step(out, t, x, **(step_kwargs or {})).prev_sample
    finally:
        if original is not None:
            module.randn_tensor = original
    return np.asarray(ours), x.numpy()


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())
