"""DDIM (Song et al. 2021), with eta > 0 adding its stochastic term."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.base import ScheduleConfig, add_noise_vp, alphas_cumprod, leading_timesteps, predicted_original


class DDIM:
    DEFAULTS = {"clip_sample": True}  # diffusers' DDIMScheduler defaults that differ from ScheduleConfig's
    CLIPS_X0 = True  # its predicted x0 is clipped where cfg.clip_sample (sdjax.previews shows it so)
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, cfg: ScheduleConfig, num_steps: int, eta: float = 0.0):
        self.cfg, self.eta = cfg, float(eta)
        self.needs_noise = self.eta > 0
        ac = alphas_cumprod(cfg)
        self.alphas_cumprod = ac
        self.timesteps = leading_timesteps(cfg, num_steps)
        prev = self.timesteps - cfg.num_train_timesteps // num_steps
        final = np.float32(1.0) if cfg.set_alpha_to_one else ac[0]
        self.alpha_t = ac[self.timesteps]
        self.alpha_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(np.float32)

    def init(self, sample):
        return ()

    def scale_model_input(self, state, sample, i):
        return sample

    def step(self, state, model_output, i, sample, noise):
        a_t, a_prev = jnp.asarray(self.alpha_t)[i], jnp.asarray(self.alpha_prev)[i]
        x0, eps = predicted_original(self.cfg, model_output, sample, a_t)
        if self.cfg.clip_sample:
            r = self.cfg.clip_sample_range
            x0 = jnp.clip(x0, -r, r)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * jnp.sqrt(variance)
        prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std ** 2) * eps
        if self.needs_noise:
            prev = prev + std * noise
        return state, prev

    def add_noise(self, original, noise, i):
        """The forward process q(x_t | x_0) at t = timesteps[i]."""
        return add_noise_vp(original, noise, self.alphas_cumprod[self.timesteps[i]])
