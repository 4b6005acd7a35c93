"""Heun's second-order sampler (Karras et al. 2022, Algorithm 1 without churn), as diffusers' HeunDiscreteScheduler.

Each of the num_steps intervals takes two model calls, so the timestep list is expanded like the
reference's, [t0, t1, t1, t2, t2, ..., t_{n-1}, t_{n-1}]: even loop indices take the Euler (first-order)
step and remember its derivative and start sample in the state; odd indices evaluate the model at the
Euler result and redo the step from the remembered sample with the averaged derivative. The last
interval (down to sigma 0) is a plain Euler step, as in the reference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.base import ScheduleConfig, SigmaSpaceMixin, discrete_sigmas, sigma_predicted_original


class Heun(SigmaSpaceMixin):
    # HeunDiscreteScheduler's own defaults (unlike the other families, its betas start at 0.00085)
    DEFAULTS = {"timestep_spacing": "linspace", "beta_start": 0.00085, "beta_end": 0.012}
    order = 2
    needs_noise = False
    CLIPS_X0 = True  # its predicted x0 is clipped where cfg.clip_sample (sdjax.previews shows it so)

    def __init__(self, cfg: ScheduleConfig, num_steps: int):
        # HeunDiscreteScheduler has no zero-SNR rescaling; like diffusers' from_config, ignore the key.
        cfg = dataclasses.replace(cfg, rescale_betas_zero_snr=False)
        self.cfg = cfg
        timesteps, sigmas = discrete_sigmas(cfg, num_steps)
        self.timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)]).astype(np.float32)
        self._set_sigmas(np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]]))
        s = self.sigmas
        idx = np.arange(len(self.timesteps))
        self.first = idx % 2 == 0
        # Step size: an Euler step goes from s[i] to s[i + 1]; its correction reuses that same step.
        self.dt = np.where(self.first, s[np.minimum(idx + 1, len(s) - 1)] - s[idx], s[idx] - s[np.maximum(idx - 1, 0)])
        self.dt = self.dt.astype(np.float32)

    def init(self, sample: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(derivative of the pending Euler step, the sample it started from)."""
        return jnp.zeros_like(sample), jnp.zeros_like(sample)

    def step(self, state: tuple[jax.Array, jax.Array], model_output: jax.Array, i: jax.Array, sample: jax.Array,
             noise: jax.Array | None) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        prev_derivative, start = state
        # Both halves evaluate the model at s[i]: the Euler half at its start, the correction at its end.
        sigma = jnp.asarray(self.sigmas)[i]
        x0 = sigma_predicted_original(self.cfg, model_output, sample, sigma)
        if self.cfg.clip_sample:
            x0 = jnp.clip(x0, -self.cfg.clip_sample_range, self.cfg.clip_sample_range)
        derivative = (sample - x0) / sigma
        first = jnp.asarray(self.first)[i]
        derivative = jnp.where(first, derivative, (prev_derivative + derivative) / 2)
        base = jnp.where(first, sample, start)
        prev = base + derivative * jnp.asarray(self.dt)[i]
        return (derivative, sample), prev
