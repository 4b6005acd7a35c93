"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) with a corrector (UniC) that reuses the next model
output, as diffusers' UniPCMultistepScheduler with solver_order <= 2 and solver_type bh1/bh2.

Every step k first corrects the sample that the previous predictor produced, using this step's model
output, then predicts the next sample. With h = lambda_t - lambda_s (half-log-SNR) and hh = -h for
data prediction (h for noise prediction), both updates have the form
    x_t = c_x * x_s - c_m * m_s - c_res * (sum_j rho_j * D_j),
where D_j are divided differences of the converted model outputs m. The rho_j solve a small linear
system in the step-size ratios only, so every scalar is a host table per loop index; the state carries
the last two converted outputs, the sample before the last prediction, the step count and last order.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.base import (ScheduleConfig, VPSigmaMixin, karras_sigmas, multistep_timesteps,
                                   require_options, sigma_to_t, train_sigmas, vp_alpha_sigma,
                                   vp_predicted_original)

_FAMILY = "UniPCMultistepScheduler"


class UniPCState(NamedTuple):
    m_prev: jax.Array       # converted model output of the previous step
    m_prev2: jax.Array      # ... and of the one before
    last_sample: jax.Array  # the sample the previous prediction started from (the corrector redoes that step)
    taken: jax.Array        # steps taken in this run (int32)
    last_order: jax.Array   # order of the previous prediction (int32); the corrector uses the same


class UniPC(VPSigmaMixin):
    """UniPC-p (p = solver_order) with bh1/bh2 B(h), data (predict_x0) or noise prediction.

    One deliberate difference: with bh1 the reference's last step to sigma 0 is NaN (B(h) = -inf times a
    zero residual); here that first-order step is just the x0 prediction.
    """

    DEFAULTS = {"timestep_spacing": "linspace"}  # diffusers' UniPCMultistepScheduler default
    order = 1
    needs_noise = False

    def __init__(self, cfg: ScheduleConfig, num_steps: int):
        require_options(cfg, _FAMILY, solver_order=(1, 2), solver_type=("bh1", "bh2", "midpoint", "heun", "logrho"),
                        predict_x0=(True, False), final_sigmas_type=("zero", "sigma_min"), solver_p=(None,),
                        use_exponential_sigmas=(False, None), use_beta_sigmas=(False, None),
                        use_flow_sigmas=(False, None), use_dynamic_shifting=(False, None), shift_terminal=(None,))
        self.cfg = cfg
        self.solver_order = int(cfg.get("solver_order", 2))
        self.predict_x0 = bool(cfg.get("predict_x0", True))
        bh1 = cfg.get("solver_type", "bh2") == "bh1"  # the reference maps DPM-Solver's types onto bh2
        final_zero = cfg.get("final_sigmas_type", "zero") == "zero"
        if final_zero and not self.predict_x0:
            # A noise-prediction step to sigma 0 multiplies 0 by e^inf: NaN in the reference, so refuse it.
            raise ValueError(f"{_FAMILY}: predict_x0=False needs final_sigmas_type='sigma_min' "
                             "(a last step to sigma 0 is undefined)")

        full = train_sigmas(cfg)
        timesteps = multistep_timesteps(cfg, num_steps)
        if cfg.use_karras_sigmas:
            lo, hi = cfg.get("sigma_min", None), cfg.get("sigma_max", None)
            sigmas = karras_sigmas(full[-1].item() if hi is None else hi, full[0].item() if lo is None else lo,
                                   num_steps)
            timesteps = sigma_to_t(sigmas, np.log(full)).round().astype(np.int64)
            last = 0.0 if final_zero else sigmas[-1]  # unlike DPM-Solver: the last Karras sigma
        else:
            sigmas = np.interp(timesteps, np.arange(len(full)), full)
            last = 0.0 if final_zero else full[0]
        self.timesteps = timesteps
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        n = len(timesteps)
        self.alpha, self.sigma, self._lam = vp_alpha_sigma(self.sigmas)

        # Predictor at k: s0 = k -> t = k + 1, history k - 1. Corrector at k: s0 = k - 1 -> t = k, history k - 2.
        self.p_x, self.p_m, self.p_d = (np.zeros(n, np.float32) for _ in range(3))
        self.c_x, self.c_m, self.c_o1, self.c_o2, self.c_d = (np.zeros(n, np.float32) for _ in range(5))
        for k in range(n):  # (a last step to sigma 0 gives r = 0; only lower_order_final=False ever uses it)
            cx, cm, res, b, r = self._coefficients(k + 1, k, k - 1 if k >= 1 else None, bh1)
            self.p_x[k], self.p_m[k] = cx, cm
            if r is not None:  # order 2: rho_p = 1/2 on D = (m_prev - m) / r
                with np.errstate(divide="ignore"):
                    self.p_d[k] = res * np.float32(0.5) / r
            if k >= 1:
                cx, cm, res, b, r = self._coefficients(k, k - 1, k - 2 if k >= 2 else None, bh1)
                self.c_x[k], self.c_m[k] = cx, cm
                self.c_o1[k] = res * np.float32(0.5)  # order 1: rho_c = 1/2 on (m_t - m_s)
                if r is not None:  # order 2: rho_c solves [[1, 1], [r, 1]] rho = b
                    rho = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.asarray(b, np.float64))
                    rho = rho.astype(np.float32)
                    self.c_o2[k], self.c_d[k] = res * rho[1], res * rho[0] / r
        # The corrector is skipped at the first step of a run and where disable_corrector names the previous step.
        disabled = set(int(j) for j in cfg.get("disable_corrector", ()) or ())
        self.corrector_on = np.array([k >= 1 and k - 1 not in disabled for k in range(n)])
        # Highest prediction order per index; lower_order_final drops it near the end.
        cap = [min(self.solver_order, n - k) if cfg.get("lower_order_final", True) else self.solver_order
               for k in range(n)]
        self.order_cap = np.array(cap, np.int32)

    def _coefficients(self, t: int, s0: int, s1: int | None, bh1: bool):
        """(c_x, c_m, c_res, b, r) of the step s0 -> t, with r = (lambda_s1 - lambda_s0) / h when s1 is given.

        Float32 like the reference, so its rounding is matched.
        """
        f = np.float32
        lam, a, s = self._lam, self.alpha, self.sigma
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            h = lam[t] - lam[s0]
            hh = -h if self.predict_x0 else h
            h_phi_1 = np.expm1(hh)
            b_h = hh if bh1 else np.expm1(hh)
            if self.predict_x0:
                cx, cm, res = s[t] / s[s0], a[t] * h_phi_1, a[t] * b_h
            else:
                cx, cm, res = a[t] / a[s0], s[t] * h_phi_1, s[t] * b_h
            h_phi_k = h_phi_1 / hh - f(1)
            b = []
            fact = 1
            for i in range(1, 3):
                b.append(h_phi_k * f(fact) / b_h)
                fact *= i + 1
                h_phi_k = h_phi_k / hh - f(1 / fact)
            r = None if s1 is None else (lam[s1] - lam[s0]) / h
        return f(cx), f(cm), f(res), [f(v) for v in b], r

    def init(self, sample: jax.Array) -> UniPCState:
        z = jnp.zeros_like(sample)
        return UniPCState(z, z, z, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def step(self, state: UniPCState, model_output: jax.Array, i: jax.Array, sample: jax.Array,
             noise: jax.Array | None) -> tuple[UniPCState, jax.Array]:
        tab = lambda a: jnp.asarray(a)[i]
        alpha, sigma = tab(self.alpha[:-1]), tab(self.sigma[:-1])
        if self.predict_x0:
            m = vp_predicted_original(self.cfg, model_output, sample, alpha, sigma)
        else:  # noise prediction: convert the output to epsilon
            p = self.cfg.prediction_type
            m = (model_output if p == "epsilon" else (sample - alpha * model_output) / sigma if p == "sample"
                 else alpha * model_output + sigma * sample)

        # UniC: redo the previous step from last_sample with this step's output.
        m_s, x_s = state.m_prev, state.last_sample
        res = jnp.where(state.last_order == 2,
                        tab(self.c_o2) * (m - m_s) + tab(self.c_d) * (state.m_prev2 - m_s),
                        tab(self.c_o1) * (m - m_s))
        corrected = tab(self.c_x) * x_s - tab(self.c_m) * m_s - res
        sample = jnp.where((state.taken > 0) & tab(self.corrector_on), corrected, sample)

        # UniP: predict the next sample; warm up from order 1 at the start of a run.
        order = jnp.minimum(tab(self.order_cap), state.taken + 1)
        prev = tab(self.p_x) * sample - tab(self.p_m) * m
        prev = prev - jnp.where(order == 2, tab(self.p_d) * (state.m_prev - m), 0)
        new = UniPCState(m, state.m_prev, sample, state.taken + 1, order)
        return new, prev
