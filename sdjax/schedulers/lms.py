"""Linear multistep (LMS) sampling of the probability-flow ODE in sigma space, as diffusers'
LMSDiscreteScheduler.

The reference integrates the Lagrange basis polynomials over [sigma_i, sigma_{i+1}] with scipy's quad at
every step. Those integrals depend only on the sigma schedule, so they are computed once here on the host
(exactly: the integrands are polynomials of degree < order) into a (steps, order) table, and step() is a
weighted sum of the current and the last order-1 derivatives kept in the state.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial import polynomial as P

from sdjax.schedulers.base import ScheduleConfig, SigmaSpaceMixin, discrete_sigmas, sigma_predicted_original


class LMSState(NamedTuple):
    derivatives: jax.Array  # (order - 1, *sample.shape) previous dx/dsigma, newest first


def lms_coefficients(sigmas: np.ndarray, order: int) -> np.ndarray:
    """(steps, order) weights of the newest..oldest derivative for each step sigma_i -> sigma_{i+1}.

    Step i uses min(i + 1, order) derivatives; weight k is the integral of the Lagrange basis polynomial
    of node sigma_{i-k} over the step (nodes sigma_i, ..., sigma_{i-o+1}).
    """
    s = sigmas.astype(np.float64)
    coeffs = np.zeros((len(s) - 1, order), np.float64)
    for i in range(len(s) - 1):
        nodes = s[i - np.arange(min(i + 1, order))]
        for k, node in enumerate(nodes):
            others = np.delete(nodes, k)
            basis = P.polyfromroots(others) / np.prod(node - others)
            antiderivative = P.polyint(basis)
            coeffs[i, k] = P.polyval(s[i + 1], antiderivative) - P.polyval(s[i], antiderivative)
    return coeffs.astype(np.float32)


class LMS(SigmaSpaceMixin):
    """Order-`lms_order` (default 4, the reference's) Adams-Bashforth steps on dx/dsigma = (x - x0) / sigma."""

    DEFAULTS = {"timestep_spacing": "linspace"}  # diffusers' LMSDiscreteScheduler default
    order = 1
    needs_noise = False

    def __init__(self, cfg: ScheduleConfig, num_steps: int, lms_order: int = 4):
        if lms_order < 1:
            raise ValueError(f"lms_order must be >= 1, got {lms_order}")
        # LMSDiscreteScheduler has no clip_sample/rescale_betas_zero_snr; like diffusers' from_config, ignore them.
        cfg = dataclasses.replace(cfg, clip_sample=False, rescale_betas_zero_snr=False)
        self.cfg, self.lms_order = cfg, int(lms_order)
        self.timesteps, sigmas = discrete_sigmas(cfg, num_steps)
        self._set_sigmas(sigmas)  # also init_noise_sigma, scale_model_input and add_noise (x0 + sigma_i * noise)
        self.coeffs = lms_coefficients(self.sigmas, self.lms_order)

    def init(self, sample: jax.Array) -> LMSState:
        return LMSState(jnp.zeros((self.lms_order - 1,) + sample.shape, sample.dtype))

    def step(self, state: LMSState, model_output: jax.Array, i: jax.Array, sample: jax.Array,
             noise: jax.Array | None) -> tuple[LMSState, jax.Array]:
        """x_{i+1} = x_i + sum_k coeffs[i, k] * d_{i-k}, with d = (x - x0) / sigma from this model output."""
        sigma = jnp.asarray(self.sigmas)[i]
        x0 = sigma_predicted_original(self.cfg, model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        c = jnp.asarray(self.coeffs)[i]
        # Coefficients past the current order are zero, so the zero-initialised history never contributes.
        update = c[0] * derivative + jnp.tensordot(c[1:], state.derivatives, axes=1)
        history = jnp.concatenate([derivative[None], state.derivatives])[: self.lms_order - 1]
        return LMSState(history), sample + update
