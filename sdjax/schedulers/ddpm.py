"""DDPM ancestral sampling (Ho et al. 2020) on a strided timestep schedule, as diffusers' DDPMScheduler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.base import ScheduleConfig, add_noise_vp, alphas_cumprod, leading_timesteps, predicted_original

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


class DDPM:
    """x_{t-1} ~ q(x_{t-1} | x_t, x0_hat): the posterior mean plus fixed-variance noise, one model call a step."""

    DEFAULTS = {"clip_sample": True}  # diffusers' DDPMScheduler defaults that differ from ScheduleConfig's
    CLIPS_X0 = True  # its predicted x0 is clipped where cfg.clip_sample (sdjax.previews shows it so)
    order = 1
    init_noise_sigma = 1.0
    needs_noise = True

    def __init__(self, cfg: ScheduleConfig, num_steps: int):
        # The reference has no set_alpha_to_one: past the last step alpha_bar is always 1.
        self.cfg = cfg
        variance_type = cfg.get("variance_type", "fixed_small")
        if variance_type not in VARIANCE_TYPES:
            # fixed_large_log takes sqrt(log(beta)) in the reference (NaN); learned* need a 2x-channel UNet.
            raise ValueError(f"scheduler_config: variance_type={variance_type!r} is not supported "
                             f"(supported: {', '.join(VARIANCE_TYPES)})")
        if num_steps > cfg.num_train_timesteps:
            raise ValueError(f"num_steps={num_steps} exceeds num_train_timesteps={cfg.num_train_timesteps}")
        ac = alphas_cumprod(cfg)
        self.alphas_cumprod = ac
        self.timesteps = leading_timesteps(cfg, num_steps)
        # The previous timestep is the next table entry (any spacing); after the last, alpha_bar = 1.
        a_t = ac[self.timesteps]
        a_prev = np.concatenate([a_t[1:], np.ones(1, np.float32)])
        # float32 throughout, as the reference evaluates these per step on float32 tensors.
        beta_t, beta_prev = np.float32(1) - a_t, np.float32(1) - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = np.float32(1) - cur_alpha
        self.alpha_t = a_t
        self.x0_coeff = (np.sqrt(a_prev) * cur_beta / beta_t).astype(np.float32)
        self.sample_coeff = (np.sqrt(cur_alpha) * beta_prev / beta_t).astype(np.float32)
        posterior_var = np.maximum(beta_prev / beta_t * cur_beta, np.float32(1e-20))
        if variance_type == "fixed_small":
            std = np.sqrt(posterior_var)
        elif variance_type == "fixed_small_log":
            std = np.exp(np.float32(0.5) * np.log(posterior_var))
        else:
            std = np.sqrt(cur_beta)
        # The reference adds no noise at timestep 0 (the final step of leading/linspace spacing).
        self.noise_std = np.where(self.timesteps > 0, std, 0).astype(np.float32)

    def init(self, sample: jax.Array) -> tuple:
        return ()

    def scale_model_input(self, state: tuple, sample: jax.Array, i: jax.Array) -> jax.Array:
        return sample

    def step(self, state: tuple, model_output: jax.Array, i: jax.Array, sample: jax.Array,
             noise: jax.Array | None) -> tuple[tuple, jax.Array]:
        """The posterior mean from the predicted x0, plus noise_std[i] * noise."""
        x0, _ = predicted_original(self.cfg, model_output, sample, jnp.asarray(self.alpha_t)[i])
        if self.cfg.clip_sample:
            r = self.cfg.clip_sample_range
            x0 = jnp.clip(x0, -r, r)
        prev = jnp.asarray(self.x0_coeff)[i] * x0 + jnp.asarray(self.sample_coeff)[i] * sample
        return state, prev + jnp.asarray(self.noise_std)[i] * noise

    def add_noise(self, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """The forward process q(x_t | x_0) at t = timesteps[i]."""
        return add_noise_vp(original, noise, self.alphas_cumprod[self.timesteps[i]])
