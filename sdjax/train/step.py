"""The training state and the one pure step: train_step(state, batch) -> (state, metrics).

    batch -> the task's objective (sdjax.train.objectives: diffusion, VAE or contrastive loss)
          -> gradients (optionally over scanned micro-batches) -> clip -> AdamW -> EMA

A step whose loss, gradient, learning rate or clipping scale is not finite consumes its batch but
changes no parameter, optimizer or EMA value; `bad_steps` counts such steps in a row so the loop can
stop the run.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sdjax.seeds import seed_key
from sdjax.train.objectives import Objective, diffusion_objective
from sdjax.train.optimizer import AdamW


class TrainState(flax.struct.PyTreeNode):
    """Everything a step reads and writes. `frozen` (networks not trained) is not checkpointed."""

    step: jax.Array          # int32: batches consumed
    params: dict[str, Any]   # trained networks by name ("unet", optionally "text_encoder"), float32
    opt_state: Any
    ema: dict[str, Any]      # exponential moving average of params (what is exported)
    rng: jax.Array           # uint32 key data; step s uses fold_in(rng, s)
    bad_steps: jax.Array     # int32: non-finite steps in a row
    frozen: dict[str, Any] = flax.struct.field(default_factory=dict)


def init_state(params: dict[str, Any], trained_names: tuple[str, ...], config: ml_collections.ConfigDict,
               tx: AdamW) -> TrainState:
    """The step-0 state from the networks' parameters, training those named `trained_names` (jittable,
    so it can run with sharded outputs)."""
    names = tuple(trained_names)
    trained = {n: params[n] for n in names}
    return TrainState(step=jnp.int32(0), params=trained, opt_state=tx.init(trained),
                      ema=jax.tree.map(jnp.copy, trained),
                      rng=jax.random.key_data(seed_key(config.seed)), bad_steps=jnp.int32(0),
                      frozen={n: p for n, p in params.items() if n not in names})


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
    """The EMA decay at `step`, warmed up as min(decay, (1 + step) / (10 + step)) so that short runs'
    averages are not dominated by the initial weights."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1 + step) / (10 + step))


def make_train_step(model, config: ml_collections.ConfigDict, tx: AdamW,
                    param_shardings: Any = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The UNet's diffusion step for `model` (a sdjax.Model; see `make_step`)."""
    return make_step(diffusion_objective(model, config), config, tx, param_shardings)


def make_step(objective: Objective, config: ml_collections.ConfigDict, tx: AdamW,
              param_shardings: Any = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step minimising `objective` (jit it with donate_argnums=0). `param_shardings` (the
    trained params' shardings) keep accumulated gradients sharded like the parameters."""
    accum = config.grad_accum_steps
    opt_cfg = config.optimizer
    if accum > 1 and not objective.separable:
        raise ValueError(f"grad_accum_steps {accum}: task {config.task!r} has a loss over the whole batch "
                         "(contrastive), which micro-batches would change; use grad_accum_steps = 1")

    def micro_loss(params, frozen, batch, rand):
        return objective.loss({**frozen, **params}, batch, rand)

    grad_fn = jax.value_and_grad(micro_loss)

    def loss_and_grads(params, frozen, batch, key):
        rand = objective.draws(key, batch)
        if accum == 1:
            return grad_fn(params, frozen, batch, rand)
        # Micro-batch k takes rows k, k + accum, ...: every device holds rows of every micro-batch, so
        # each one stays split over the whole batch mesh (contiguous blocks would sit on a few devices).
        split = lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)
        # Without these constraints GSPMD may keep the scan's accumulator replicated under FSDP.
        like_params = ((lambda tree: jax.tree.map(jax.lax.with_sharding_constraint, tree, param_shardings))
                       if param_shardings is not None else (lambda tree: tree))

        def body(carry, micro):
            loss, grads = grad_fn(params, frozen, *micro)
            total_loss, total_grads = carry
            return (total_loss + loss, like_params(jax.tree.map(jnp.add, total_grads, like_params(grads)))), None

        zeros = (jnp.float32(0), like_params(jax.tree.map(jnp.zeros_like, params)))
        (loss, grads), _ = jax.lax.scan(body, zeros, jax.tree.map(split, (batch, rand)))
        return loss / accum, jax.tree.map(lambda g: g / accum, grads)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, grads = loss_and_grads(state.params, state.frozen, batch, key)
        grad_norm = optax.global_norm(grads)
        decay = ema_decay(state.step, opt_cfg.ema_decay) if opt_cfg.ema_decay > 0 else None
        params, opt_state, ema, finite = tx.apply(grads, grad_norm, state.opt_state, state.params, state.ema,
                                                  decay, jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                                  bad_steps=jnp.where(finite, 0, state.bad_steps + 1))
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
                   "bad_steps": new_state.bad_steps}
        return new_state, metrics

    return train_step


def param_count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
