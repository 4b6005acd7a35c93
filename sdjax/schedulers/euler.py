"""Euler and Euler-ancestral samplers (Karras et al. 2022, Algorithm 2 and k-diffusion's ancestral variant).

Both move the sample in sigma space (x = x0 + sigma * noise), like diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler, and take the same config options.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.base import (ScheduleConfig, SigmaSpaceMixin, discrete_sigmas, require_options,
                                   sigma_predicted_original, sigma_timesteps, train_sigmas)


class Euler(SigmaSpaceMixin):
    """Euler steps along the probability-flow ODE; s_churn > 0 adds Karras' stochastic churn."""

    DEFAULTS = {"timestep_spacing": "linspace"}  # diffusers' EulerDiscreteScheduler default
    order = 1

    def __init__(self, cfg: ScheduleConfig, num_steps: int, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0):
        require_options(cfg, "EulerDiscreteScheduler", interpolation_type=("linear",),
                        final_sigmas_type=("zero", "sigma_min"))
        if cfg.get("timestep_type", "discrete") == "continuous" and cfg.prediction_type == "v_prediction":
            raise ValueError("EulerDiscreteScheduler: timestep_type='continuous' with v_prediction is not "
                             "supported by sdjax (supported: 'discrete')")
        self.cfg = cfg
        # Karras / exponential / beta respacing may take its end points from the config.
        self.timesteps, sigmas = discrete_sigmas(cfg, num_steps, cfg.get("sigma_min", None), cfg.get("sigma_max", None))
        if cfg.get("final_sigmas_type", "zero") == "sigma_min":
            sigmas[-1] = train_sigmas(cfg)[0]
        self._set_sigmas(sigmas)
        sig = self.sigmas[:-1]
        # Churn raises the noise level to sigma_hat before the step, on the host-known sigmas only.
        in_range = (s_tmin <= sig) & (sig <= s_tmax)
        gamma = np.where(in_range, min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1), 0.0)
        self.sigma_hat = (sig * (gamma + 1).astype(np.float32)).astype(np.float32)
        churn = np.sqrt(np.maximum(self.sigma_hat ** 2 - sig ** 2, 0)) * np.float32(s_noise)
        self.churn_std = np.where(gamma > 0, churn, 0).astype(np.float32)
        self.dt = (self.sigmas[1:] - self.sigma_hat).astype(np.float32)
        self.needs_noise = bool((gamma > 0).any())

    def init(self, sample: jax.Array) -> tuple:
        return ()

    def step(self, state: tuple, model_output: jax.Array, i: jax.Array, sample: jax.Array,
             noise: jax.Array | None) -> tuple[tuple, jax.Array]:
        sigma, sigma_hat = jnp.asarray(self.sigmas)[i], jnp.asarray(self.sigma_hat)[i]
        if self.needs_noise:
            sample = sample + noise * jnp.asarray(self.churn_std)[i]
        x0 = sigma_predicted_original(self.cfg, model_output, sample, sigma, eps_sigma=sigma_hat)
        derivative = (sample - x0) / sigma_hat
        return state, sample + derivative * jnp.asarray(self.dt)[i]


class EulerAncestral(SigmaSpaceMixin):
    """Euler step down to sigma_down, then fresh noise back up to the next sigma (stochastic).

    As in diffusers, "sample" predictions and Karras sigmas are not part of this family (the latter is
    ignored there, so here too).
    """

    DEFAULTS = {"timestep_spacing": "linspace"}  # diffusers' EulerAncestralDiscreteScheduler default
    order = 1
    needs_noise = True

    def __init__(self, cfg: ScheduleConfig, num_steps: int):
        if cfg.prediction_type == "sample":
            raise ValueError("EulerAncestralDiscreteScheduler: prediction_type='sample' is not supported "
                             "(supported: epsilon, v_prediction)")
        self.cfg = cfg
        self.timesteps = sigma_timesteps(cfg, num_steps)
        train = train_sigmas(cfg)
        self._set_sigmas(np.append(np.interp(self.timesteps, np.arange(len(train)), train), 0.0))
        s_from, s_to = self.sigmas[:-1], self.sigmas[1:]
        self.sigma_up = np.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2).astype(np.float32)
        self.dt = (np.sqrt(s_to ** 2 - self.sigma_up ** 2) - s_from).astype(np.float32)

    def init(self, sample: jax.Array) -> tuple:
        return ()

    def step(self, state: tuple, model_output: jax.Array, i: jax.Array, sample: jax.Array,
             noise: jax.Array) -> tuple[tuple, jax.Array]:
        sigma = jnp.asarray(self.sigmas)[i]
        x0 = sigma_predicted_original(self.cfg, model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        prev = sample + derivative * jnp.asarray(self.dt)[i]
        return state, prev + noise * jnp.asarray(self.sigma_up)[i]


__all__ = ["Euler", "EulerAncestral"]
