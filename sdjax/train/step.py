"""The training state and the one pure step: train_step(state, batch) -> (state, metrics).

    batch (pixels in [-1, 1], token ids) -> frozen VAE encode x scaling factor -> noise at uniform
    timesteps -> UNet predicts epsilon / v -> (min-SNR weighted) MSE -> AdamW -> EMA

A step whose loss or gradient is not finite consumes its batch but changes no parameter, optimizer
or EMA value; `bad_steps` counts such steps in a row so the loop can stop the run.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sdjax.schedulers.base import ScheduleConfig, alphas_cumprod
from sdjax.train.loss import min_snr_weights, noise_latents, prediction_target, sample_noise, weighted_mse


class TrainState(flax.struct.PyTreeNode):
    """Everything a step reads and writes. `frozen` (networks not trained) is not checkpointed."""

    step: jax.Array          # int32: batches consumed
    params: dict[str, Any]   # trained networks by name ("unet", optionally "text_encoder"), float32
    opt_state: Any
    ema: dict[str, Any]      # exponential moving average of params (what is exported)
    rng: jax.Array           # uint32 key data; step s uses fold_in(rng, s)
    bad_steps: jax.Array     # int32: non-finite steps in a row
    frozen: dict[str, Any] = flax.struct.field(default_factory=dict)


def trained_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return ("unet", "text_encoder") if config.model.train_text_encoder else ("unet",)


def init_state(params: dict[str, Any], config: ml_collections.ConfigDict,
               tx: optax.GradientTransformation) -> TrainState:
    """The step-0 state from the three networks' parameters (jittable, so it can run with sharded outputs)."""
    names = trained_names(config)
    trained = {n: params[n] for n in names}
    return TrainState(step=jnp.int32(0), params=trained, opt_state=tx.init(trained),
                      ema=jax.tree.map(jnp.copy, trained),
                      rng=jax.random.key_data(jax.random.key(config.seed)), bad_steps=jnp.int32(0),
                      frozen={n: p for n, p in params.items() if n not in names})


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
    """The EMA decay at `step`, warmed up as min(decay, (1 + step) / (10 + step)) so that short runs'
    averages are not dominated by the initial weights."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1 + step) / (10 + step))


def make_train_step(sd, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                    param_shardings: Any = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step for this model and config (jit it with donate_argnums=0). `param_shardings`
    (the trained params' shardings) keep accumulated gradients sharded like the parameters."""
    schedule = ScheduleConfig.from_dict(sd.scheduler_config)
    abar = jnp.asarray(alphas_cumprod(schedule))
    num_timesteps = schedule.num_train_timesteps
    prediction_type = schedule.prediction_type
    scale = sd.vae.config.scaling_factor
    accum = config.grad_accum_steps
    loss_cfg, opt_cfg = config.loss, config.optimizer

    def draws(key: jax.Array, pixels: jax.Array) -> dict[str, jax.Array]:
        """All of a step's randomness, drawn for the whole batch up front so that splitting it into
        micro-batches changes nothing but the summation order."""
        factor = sd.vae.config.downscale
        shape = (pixels.shape[0], pixels.shape[1] // factor, pixels.shape[2] // factor, sd.vae.config.latent_channels)
        k_post, k_t, k_noise = jax.random.split(key, 3)
        return {"posterior": jax.random.normal(k_post, shape),
                "timesteps": jax.random.randint(k_t, (shape[0],), 0, num_timesteps),
                "noise": sample_noise(k_noise, shape, loss_cfg.offset_noise)}

    def micro_loss(params, frozen, batch, rand):
        networks = {**frozen, **params}
        context = sd.text_encoder.apply({"params": networks["text_encoder"]}, batch["input_ids"])[0]
        mean, logvar = sd.vae.apply({"params": networks["vae"]}, batch["pixels"], method="encode")
        latents = jax.lax.stop_gradient((mean + jnp.exp(0.5 * logvar) * rand["posterior"]) * scale)
        latents = latents.astype(jnp.float32)
        timesteps, noise = rand["timesteps"], rand["noise"]
        noisy = noise_latents(latents, timesteps, noise, abar)
        prediction = sd.unet.apply({"params": networks["unet"]}, noisy, timesteps, context)
        target = prediction_target(latents, noise, timesteps, abar, prediction_type)
        weights = min_snr_weights(timesteps, abar, loss_cfg.min_snr_gamma, prediction_type)
        return weighted_mse(prediction, target, weights)

    grad_fn = jax.value_and_grad(micro_loss)

    def loss_and_grads(params, frozen, batch, key):
        rand = draws(key, batch["pixels"])
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
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, opt_cfg.ema_decay)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
            ema=keep(ema, state.ema) if opt_cfg.ema_decay > 0 else keep(params, state.params),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1))
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
                   "bad_steps": new_state.bad_steps}
        return new_state, metrics

    return train_step


def param_count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
