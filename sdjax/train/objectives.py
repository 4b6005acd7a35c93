"""What each training task minimises, as (draws, loss) pairs that the one generic step runs.

    unet: frozen VAE encode (or its cached posterior) -> noise at uniform timesteps -> UNet predicts
          epsilon / v -> (min-SNR) MSE
    vae:  encode -> sample the posterior -> decode -> L1 + L2 reconstruction + KL to N(0, I)
    clip: image tower, text tower -> symmetric contrastive loss over the whole (global) batch

`draws(key, batch)` returns all of a step's randomness for the whole batch up front, so a step split
into micro-batches differs from one big batch only in summation order. `loss(networks, batch, rand)`
takes every network's parameters by name (trained and frozen merged).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from sdjax.conditioning import batch_conditioning, unet_call
from sdjax.models.clip import contrastive_loss
from sdjax.schedulers.base import ScheduleConfig, alphas_cumprod
from sdjax.train.loss import min_snr_weights, noise_latents, prediction_target, sample_noise, weighted_mse


class Objective(NamedTuple):
    draws: Callable[[jax.Array, dict], dict]
    loss: Callable[[dict[str, Any], dict, dict], jax.Array]
    # False where the loss couples the examples of a batch (contrastive), so micro-batches would change it.
    separable: bool = True


def _latent_shape(vae, batch: dict) -> tuple[int, ...]:
    if "latent_mean" in batch:  # cached posteriors (data.cache_latents)
        return tuple(batch["latent_mean"].shape)
    pixels, factor = batch["pixels"], vae.config.downscale
    return (pixels.shape[0], pixels.shape[1] // factor, pixels.shape[2] // factor, vae.config.latent_channels)


def diffusion_objective(model, config: ml_collections.ConfigDict) -> Objective:
    """The noise-prediction loss of latent diffusion for `model`'s UNet (VAE frozen). The batch holds the
    token ids of each tokenizer (sdjax.conditioning.tokenizer_fn), and "pixels" to encode or the
    posterior's "latent_mean" and "latent_logvar" cached by an earlier encode (sdjax.data.latent_cache):
    the same latents, sampled with the same draws. SDXL also reads the batch's "caption_dropped",
    "original_size" and "crop_top_left" (sdjax.conditioning.batch_conditioning)."""
    schedule = ScheduleConfig.from_dict(model.scheduler_config)
    abar = jnp.asarray(alphas_cumprod(schedule))
    num_timesteps, prediction_type = schedule.num_train_timesteps, schedule.prediction_type
    vae, scale = model.vae, model.vae.config.scaling_factor
    loss_cfg = config.loss

    def draws(key: jax.Array, batch: dict) -> dict[str, jax.Array]:
        shape = _latent_shape(vae, batch)
        k_post, k_t, k_noise = jax.random.split(key, 3)
        return {"posterior": jax.random.normal(k_post, shape),
                "timesteps": jax.random.randint(k_t, (shape[0],), 0, num_timesteps),
                "noise": sample_noise(k_noise, shape, loss_cfg.offset_noise)}

    def loss(networks: dict[str, Any], batch: dict, rand: dict) -> jax.Array:
        shape = _latent_shape(vae, batch)
        cond = batch_conditioning(model, networks, batch, (shape[1] * vae.config.downscale,
                                                           shape[2] * vae.config.downscale))
        if "latent_mean" in batch:
            mean, logvar = batch["latent_mean"], batch["latent_logvar"]
        else:
            mean, logvar = vae.apply({"params": networks["vae"]}, batch["pixels"], method="encode")
        latents = jax.lax.stop_gradient((mean + jnp.exp(0.5 * logvar) * rand["posterior"]) * scale)
        latents = latents.astype(jnp.float32)
        timesteps, noise = rand["timesteps"], rand["noise"]
        noisy = noise_latents(latents, timesteps, noise, abar)
        prediction = unet_call(model, networks)(noisy, timesteps, cond)
        target = prediction_target(latents, noise, timesteps, abar, prediction_type)
        weights = min_snr_weights(timesteps, abar, loss_cfg.min_snr_gamma, prediction_type)
        return weighted_mse(prediction, target, weights)

    return Objective(draws, loss)


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over a latent, averaged over the batch."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.mean(jnp.sum(kl.astype(jnp.float32), axis=tuple(range(1, kl.ndim))))


def random_crops(pixels: jax.Array, corners: jax.Array, side: int) -> jax.Array:
    """(B, side, side, C) crops of `pixels` (B, H, W, C) with top-left corners (B, 2)."""
    channels = pixels.shape[-1]
    crop = lambda image, corner: jax.lax.dynamic_slice(image, (corner[0], corner[1], 0), (side, side, channels))
    return jax.vmap(crop)(pixels, corners)


def vae_objective(vae, config: ml_collections.ConfigDict) -> Objective:
    """Reconstruction (l1_weight x L1 + l2_weight x MSE, per pixel) + kl_weight x KL of the posterior.

    With loss.crop > 0 the VAE trains on random crops of that side (it is fully convolutional, and
    crops cut the cost of the full-resolution decoder); evaluation always uses whole images.
    """
    cfg = config.loss

    def draws(key: jax.Array, batch: dict) -> dict[str, jax.Array]:
        pixels = batch["pixels"]
        side = cfg.crop or pixels.shape[1]
        k_post, k_crop = jax.random.split(key)
        batch_size = pixels.shape[0]
        factor = vae.config.downscale
        shape = (batch_size, side // factor, side // factor, vae.config.latent_channels)
        # Corners on the latent grid, so a crop's latents line up with the whole image's.
        limit = jnp.asarray([pixels.shape[1] - side, pixels.shape[2] - side]) // factor + 1
        corners = jax.random.randint(k_crop, (batch_size, 2), 0, limit) * factor
        return {"posterior": jax.random.normal(k_post, shape), "corners": corners}

    def loss(networks: dict[str, Any], batch: dict, rand: dict) -> jax.Array:
        pixels = batch["pixels"]
        if cfg.crop:
            pixels = random_crops(pixels, rand["corners"], cfg.crop)
        params = {"params": networks["vae"]}
        mean, logvar = vae.apply(params, pixels, method="encode")
        latents = mean + jnp.exp(0.5 * logvar) * rand["posterior"]
        recon = vae.apply(params, latents, method="decode").astype(jnp.float32)
        error = recon - pixels.astype(jnp.float32)
        reconstruction = cfg.l1_weight * jnp.mean(jnp.abs(error)) + cfg.l2_weight * jnp.mean(jnp.square(error))
        # KL is per latent (summed); divide by pixels so kl_weight is on the reconstruction's per-pixel scale.
        pixel_count = pixels.shape[1] * pixels.shape[2] * pixels.shape[3]
        return reconstruction + cfg.kl_weight * kl_to_standard_normal(mean, logvar) / pixel_count

    return Objective(draws, loss)


def clip_objective(clip) -> Objective:
    """The symmetric contrastive loss of image-caption pairs (no randomness of its own)."""

    def loss(networks: dict[str, Any], batch: dict, rand: dict) -> jax.Array:
        image_emb, text_emb, logit_scale = clip.apply({"params": networks["clip"]}, batch["pixels"],
                                                      batch["input_ids"])
        return contrastive_loss(image_emb, text_emb, logit_scale)

    return Objective(lambda key, batch: {}, loss, separable=False)
