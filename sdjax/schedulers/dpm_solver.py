"""DPM-Solver++ 2M (Lu et al. 2022, multistep data-prediction solver), as diffusers' DPMSolverMultistepScheduler
with algorithm_type "dpmsolver++" and solver_order <= 2.

The step from sigma_s to sigma_t in half-log-SNR lambda is, with h = lambda_t - lambda_s and x0 predictions m:
    first order:  x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) m_s
    second order: adds a multiple of (m_s - m_prev) / r, r = h_prev / h ("midpoint" or "heun" variant).
All scalar coefficients depend only on the loop index, so they are host tables; the previous x0 and the
number of steps taken (the first step of a run, img2img too, is first order) live in the state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.base import (ScheduleConfig, VPSigmaMixin, karras_sigmas, multistep_timesteps,
                                   require_options, sigma_to_t, train_sigmas, vp_alpha_sigma,
                                   vp_predicted_original)

_FAMILY = "DPMSolverMultistepScheduler"


class DPMSolverPP2M(VPSigmaMixin):
    DEFAULTS = {"timestep_spacing": "linspace"}  # diffusers' DPMSolverMultistepScheduler default
    order = 1
    needs_noise = False

    def __init__(self, cfg: ScheduleConfig, num_steps: int):
        require_options(cfg, _FAMILY, algorithm_type=("dpmsolver++", "deis"), solver_order=(1, 2),
                        solver_type=("midpoint", "heun", "logrho", "bh1", "bh2"),
                        final_sigmas_type=("zero", "sigma_min"), variance_type=(None,),
                        use_exponential_sigmas=(False, None), use_beta_sigmas=(False, None),
                        use_lu_lambdas=(False, None), use_flow_sigmas=(False, None),
                        use_dynamic_shifting=(False, None))
        if cfg.get("algorithm_type", "dpmsolver++") == "deis" and cfg.get("final_sigmas_type", "zero") == "zero":
            # diffusers maps deis onto dpmsolver++ but, like its other non-++ types, refuses a final sigma of 0
            raise ValueError(f"{_FAMILY}: final_sigmas_type='zero' is not supported with algorithm_type='deis' "
                             "(use 'sigma_min')")
        self.cfg = cfg
        self.solver_order = int(cfg.get("solver_order", 2))
        # The reference maps the other families' solver types onto midpoint.
        heun = cfg.get("solver_type", "midpoint") == "heun"
        final_zero = cfg.get("final_sigmas_type", "zero") == "zero"

        full = train_sigmas(cfg)
        # lambda_min_clipped drops the noisiest timesteps, whose half-log-SNR -log(sigma) is below it.
        clipped = int(np.searchsorted(-np.log(full[::-1]), cfg.get("lambda_min_clipped", -np.inf), side="left"))
        timesteps = multistep_timesteps(cfg, num_steps, cfg.num_train_timesteps - clipped)
        if cfg.use_karras_sigmas:
            # Over the whole training range (not the spaced timesteps' range, as Euler does)
            sigmas = karras_sigmas(full[-1].item(), full[0].item(), num_steps)
            t = sigma_to_t(sigmas, np.log(full))
            timesteps = (t if cfg.beta_schedule == "squaredcos_cap_v2" else t.round()).astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(len(full)), full)
        last = 0.0 if final_zero else full[0]
        self.timesteps = timesteps
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)

        n = len(timesteps)
        alpha, sigma, lam = vp_alpha_sigma(self.sigmas)
        self.alpha, self.sigma = alpha[:-1], sigma[:-1]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            h = lam[1:] - lam[:-1]
            self.c_sample = sigma[1:] / sigma[:-1]
            phi = np.exp(-h) - np.float32(1)
            self.c_x0 = alpha[1:] * phi
            r = np.concatenate([[np.float32(np.nan)], h[:-1]]) / h  # r_k = h_{k-1} / h_k
            diff = alpha[1:] * (phi / h + np.float32(1)) if heun else np.float32(-0.5) * self.c_x0
            c_diff = diff / r
        # The last step is first order when the reference's lower_order_final / euler_at_final rules say so.
        first_only = np.zeros(n, bool)
        first_only[0] = True
        if self.solver_order == 1:
            first_only[:] = True
        if cfg.get("euler_at_final", False) or (cfg.get("lower_order_final", True) and n < 15) or final_zero:
            first_only[-1] = True
        self.first_only = first_only
        self.c_diff = np.where(first_only, 0, c_diff).astype(np.float32)

    def init(self, sample: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(previous step's x0 prediction, steps taken so far)."""
        return jnp.zeros_like(sample), jnp.zeros((), jnp.int32)

    def step(self, state: tuple[jax.Array, jax.Array], model_output: jax.Array, i: jax.Array, sample: jax.Array,
             noise: jax.Array | None) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        m_prev, taken = state
        tab = lambda a: jnp.asarray(a)[i]
        m = vp_predicted_original(self.cfg, model_output, sample, tab(self.alpha), tab(self.sigma))
        prev = tab(self.c_sample) * sample - tab(self.c_x0) * m
        second = (taken > 0) & ~tab(self.first_only)
        prev = prev + jnp.where(second, tab(self.c_diff) * (m - m_prev), 0)
        return (m, taken + 1), prev
