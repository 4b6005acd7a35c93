"""PNDM (Liu et al. 2022): pseudo Runge-Kutta warm-up then pseudo linear multistep (PLMS), as diffusers'
PNDMScheduler.

The reference is a state machine driven by a call counter (which restarts at 0 wherever sampling starts,
e.g. img2img). Its control flow depends only on that counter, so the host replays it once per schedule and
records, per counter value c, which buffers the call reads and writes and with what weights; the counter
itself is carried in the state. step() is then one branch-free formula:

    eff    = w_out[c] * model_output + w_acc[c] * acc + sum_k w_ets[c, k] * ets[k]
    base   = cur if use_cur[c] else sample          (cur := sample first where set_cur[c])
    prev   = transfer(base, eps(eff, base), t_from, t_to)   t_from/t_to from timesteps[i] and row c
    acc    = keep_acc[c] * acc + add_acc[c] * model_output
    ets    = [model_output, ets[0], ets[1]] where push[c]

ets holds the last three model outputs kept for the multistep formula (newest first), acc the running
Runge-Kutta average, cur the sample a Runge-Kutta group (or the first PLMS pair) started from.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.base import ScheduleConfig, add_noise_vp, alphas_cumprod, leading_timesteps

# Adams-Bashforth weights on [newest, ..., oldest] model output, by how many outputs are available.
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_RK_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


class PNDMState(NamedTuple):
    ets: jax.Array  # (3, *sample.shape) previous kept model outputs, newest first
    acc: jax.Array  # Runge-Kutta weighted sum of the current group's outputs
    cur: jax.Array  # sample the current Runge-Kutta group / first PLMS pair started from
    counter: jax.Array  # int32 scalar: calls since init, the reference's `counter`


class PNDM:
    """PLMS (skip_prk_steps=True, as Stable Diffusion ships it) or the full PRK warm-up + PLMS."""

    DEFAULTS = {"set_alpha_to_one": False, "skip_prk_steps": False}  # diffusers' PNDMScheduler defaults
    order = 1
    init_noise_sigma = 1.0
    needs_noise = False

    def __init__(self, cfg: ScheduleConfig, num_steps: int):
        # PNDMScheduler has no clip_sample or rescale_betas_zero_snr; like diffusers' from_config, ignore them.
        cfg = dataclasses.replace(cfg, clip_sample=False, rescale_betas_zero_snr=False)
        if cfg.prediction_type == "sample":
            raise ValueError("scheduler_config: prediction_type='sample' is not supported by PNDM "
                             "(supported: epsilon, v_prediction)")
        self.cfg = cfg
        n = cfg.num_train_timesteps
        ac = alphas_cumprod(cfg)
        self.alphas_cumprod = ac
        final = np.float32(1.0) if cfg.set_alpha_to_one else ac[0]
        ratio = n // num_steps
        ascending = leading_timesteps(cfg, num_steps)[::-1]

        if cfg.get("skip_prk_steps", False):
            # The second-to-last entry is repeated: calls 0 and 1 form a 2nd-order (Heun-like) first step.
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
            prk = np.zeros(0, np.int64)
        else:
            if num_steps < 4:
                raise ValueError(f"PNDM with skip_prk_steps=False needs num_steps >= 4, got {num_steps}")
            # Three RK4 groups step down the four noisiest timesteps, each evaluating t, t - ratio/2 (twice)
            # and t - ratio; the PLMS part then continues from the fourth.
            pairs = np.repeat(ascending[-4:], 2) + np.tile([0, ratio // 2], 4)
            prk = np.repeat(pairs[:-1], 2)[1:-1][::-1]
            plms = ascending[:-3][::-1]
        self.timesteps = np.concatenate([prk, plms]).astype(np.int64)

        # One row per value of the reference's call counter. Like the reference, the counter restarts at 0
        # wherever sampling starts (img2img), so it lives in the state rather than being the loop index.
        rows = []
        num_ets = 0  # how many outputs the reference's ets list holds (it keeps the last four)
        for counter in range(len(self.timesteps)):
            # The transfer goes from t_from to t_to; both are offsets from the fed timestep t unless
            # from_fixed (the RK groups always start at their first timestep).
            row = dict(w_out=0.0, w_acc=0.0, w_ets=[0.0, 0.0, 0.0], use_cur=False, set_cur=False,
                       keep_acc=1.0, add_acc=0.0, push=False, from_fixed=False, t_from=0, to_off=ratio)
            if counter < len(prk):
                phase = counter % 4
                row.update(use_cur=True, add_acc=_RK_WEIGHTS[phase], from_fixed=True,
                           t_from=int(prk[counter // 4 * 4]), to_off=0 if counter % 2 else ratio // 2)
                if phase == 0:
                    row.update(set_cur=True, push=True, w_out=1.0)
                    num_ets += 1
                elif phase < 3:
                    row.update(w_out=1.0)
                else:  # the group's RK4 combination; restart the running sum
                    row.update(w_acc=1.0, w_out=_RK_WEIGHTS[3], keep_acc=0.0, add_acc=0.0)
            elif counter == 1:
                # Averages with call 0's output and redoes call 0's step (t + ratio -> t) from call 0's sample.
                row.update(w_out=0.5, use_cur=True, t_from=ratio, to_off=0)
                row["w_ets"][0] = 0.5
            else:
                num_ets = min(num_ets, 3) + 1
                weights = _AB[num_ets]
                row.update(push=True, w_out=weights[0], set_cur=counter == 0)
                row["w_ets"][: len(weights) - 1] = weights[1:]
            rows.append(row)

        table = lambda key, dtype=np.float32: np.array([r[key] for r in rows], dtype)
        self.w_out, self.w_acc, self.w_ets = table("w_out"), table("w_acc"), table("w_ets")
        self.keep_acc, self.add_acc = table("keep_acc"), table("add_acc")
        self.use_cur, self.set_cur, self.push = table("use_cur", bool), table("set_cur", bool), table("push", bool)
        self.from_fixed = table("from_fixed", bool)
        self.t_from, self.to_off = table("t_from", np.int32), table("to_off", np.int32)
        self.final_alpha = final

    def init(self, sample: jax.Array) -> PNDMState:
        z = jnp.zeros_like(sample)
        return PNDMState(ets=jnp.zeros((3,) + sample.shape, sample.dtype), acc=z, cur=z,
                         counter=jnp.zeros((), jnp.int32))

    def scale_model_input(self, state: PNDMState, sample: jax.Array, i: jax.Array) -> jax.Array:
        return sample

    def step(self, state: PNDMState, model_output: jax.Array, i: jax.Array, sample: jax.Array,
             noise: jax.Array | None) -> tuple[PNDMState, jax.Array]:
        """One PRK or PLMS call: combine outputs by the counter's row, then apply the PNDM transfer formula."""
        tab = lambda a: jnp.asarray(a)[state.counter]
        t = jnp.asarray(self.timesteps, jnp.int32)[i]
        t_from = jnp.where(tab(self.from_fixed), tab(self.t_from), t + tab(self.t_from))
        t_to = t - tab(self.to_off)
        ac = jnp.asarray(self.alphas_cumprod)
        a_t = ac[t_from]
        a_prev = jnp.where(t_to >= 0, ac[jnp.maximum(t_to, 0)], self.final_alpha)

        cur = jnp.where(tab(self.set_cur), sample, state.cur)
        base = jnp.where(tab(self.use_cur), cur, sample)
        eff = (tab(self.w_out) * model_output + tab(self.w_acc) * state.acc
               + jnp.tensordot(tab(self.w_ets), state.ets, axes=1))
        if self.cfg.prediction_type == "v_prediction":
            eff = jnp.sqrt(a_t) * eff + jnp.sqrt(1 - a_t) * base
        # Formula (9) of the PNDM paper: x' = sqrt(a'/a) x - (a' - a) eps / (a sqrt(1-a') + sqrt(a (1-a) a')).
        denom = a_t * jnp.sqrt(1 - a_prev) + jnp.sqrt(a_t * (1 - a_t) * a_prev)
        prev = jnp.sqrt(a_prev / a_t) * base - (a_prev - a_t) / denom * eff

        acc = tab(self.keep_acc) * state.acc + tab(self.add_acc) * model_output
        pushed = jnp.concatenate([model_output[None], state.ets[:-1]])
        ets = jnp.where(tab(self.push), pushed, state.ets)
        return PNDMState(ets=ets, acc=acc, cur=cur, counter=state.counter + 1), prev

    def add_noise(self, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        """The forward process q(x_t | x_0) at t = timesteps[i]."""
        return add_noise_vp(original, noise, self.alphas_cumprod[self.timesteps[i]])
