"""AdamW with warmup and a cosine or constant schedule, and global-norm clipping, applied in one
elementwise pass per parameter together with the train step's non-finite guard and EMA.

Why not optax.chain(clip_by_global_norm, adamw) plus `jnp.where` guards: XLA then keeps model-sized
temporaries (the clipped gradients, the unguarded moments and parameters) next to the state; at SD 1.5
size the step's temporaries were 6.75 GiB instead of 3.5 (gradients + activations). Computing each
parameter's new moments, value and EMA from the guarded values in one function lets XLA write every new
value over its old buffer. The numbers are optax's (tests/test_train_step.py checks them against it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine decay to end_factor x lr, or constant."""
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule {opt.schedule!r} is unknown; known: {', '.join(SCHEDULES)}")
    lr, warmup = opt.learning_rate, opt.warmup_steps
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1),
                                                  end_value=lr * opt.end_factor)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                [warmup])


class AdamWState(NamedTuple):
    count: jax.Array  # int32: updates applied (skipped steps excluded)
    mu: Any           # first moment, like the parameters
    nu: Any           # second moment, like the parameters


@dataclasses.dataclass(frozen=True)
class AdamW:
    """optax.chain(clip_by_global_norm(clip_norm), adamw(schedule, b1, b2, eps, weight_decay)), fused
    with the step's guard and EMA (see the module docstring)."""

    schedule: optax.Schedule
    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_norm: float  # 0: no clipping

    def init(self, params: Any) -> AdamWState:
        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
        return AdamWState(count=jnp.zeros([], jnp.int32), mu=zeros(params), nu=zeros(params))

    def apply(self, grads: Any, grad_norm: jax.Array, state: AdamWState, params: Any, ema: Any,
              ema_decay: jax.Array | None, ok: jax.Array) -> tuple[Any, AdamWState, Any, jax.Array]:
        """(params, state, ema, applied) after one update where `ok` (a scalar bool: the caller's loss and
        gradient norm are finite) and this update's learning rate and clipping scale are finite; `applied`
        says whether it was. Elsewhere all three are returned unchanged. `ema_decay` None: no EMA (the
        returned ema is the new params)."""
        lr = self.schedule(state.count)
        count = state.count + 1
        correct1, correct2 = 1 - self.b1 ** count, 1 - self.b2 ** count
        # Clipping as one scalar factor (optax divides each gradient by the norm, then multiplies; the
        # results differ in the last bit, and the division form made XLA keep clipped copies).
        scale = (jnp.where(grad_norm < self.clip_norm, 1.0, self.clip_norm / grad_norm) if self.clip_norm > 0
                 else jnp.float32(1))
        # Checking the new values themselves would take a model-sized reduction before they may be written,
        # i.e. a second pass and the temporaries this module avoids. Scalars suffice: with a finite gradient
        # norm every g and g*g is finite, so from finite p, m, v, 0 <= b1, b2 < 1 and eps > 0 (check_config)
        # the new m, v, p and EMA are finite unless lr or scale is not, or a value overflows float32. The
        # loop's check of the whole state before each checkpoint save and the export catches that rest.
        ok = ok & jnp.isfinite(lr) & jnp.isfinite(scale)

        def leaf(p, g, m, v, e):
            g = g * scale.astype(g.dtype)
            m = jnp.where(ok, self.b1 * m + (1 - self.b1) * g, m)
            v = jnp.where(ok, self.b2 * v + (1 - self.b2) * g * g, v)
            step = (m / correct1) / (jnp.sqrt(v / correct2) + self.eps) + self.weight_decay * p
            p = jnp.where(ok, p - lr * step, p)
            e = p if ema_decay is None else jnp.where(ok, ema_decay * e + (1 - ema_decay) * p, e)
            return p, m, v, e

        out = jax.tree.map(leaf, params, grads, state.mu, state.nu, ema)
        new_p, new_m, new_v, new_e = jax.tree.transpose(jax.tree.structure(params), None, out)
        return new_p, AdamWState(count=jnp.where(ok, count, state.count), mu=new_m, nu=new_v), new_e, ok


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> AdamW:
    """The optimizer of a run (gradients arrive unclipped; clipping is part of it)."""
    return AdamW(learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                 weight_decay=opt.weight_decay, clip_norm=opt.grad_clip_norm)
