"""The noise-prediction objective of latent diffusion (what the UNet is trained on)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def noise_latents(latents: jax.Array, timesteps: jax.Array, noise: jax.Array,
                  alphas_cumprod: jax.Array) -> jax.Array:
    """The forward process q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, per image."""
    abar = alphas_cumprod[timesteps][:, None, None, None]
    return jnp.sqrt(abar) * latents + jnp.sqrt(1 - abar) * noise


def prediction_target(latents: jax.Array, noise: jax.Array, timesteps: jax.Array, alphas_cumprod: jax.Array,
                      prediction_type: str) -> jax.Array:
    """What the UNet should output: the noise (epsilon), v = sqrt(abar) noise - sqrt(1 - abar) x0, or x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        abar = alphas_cumprod[timesteps][:, None, None, None]
        return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * latents
    if prediction_type == "sample":
        return latents
    raise ValueError(f"prediction_type {prediction_type!r} is not one of epsilon, v_prediction, sample")


def min_snr_weights(timesteps: jax.Array, alphas_cumprod: jax.Array, gamma: float,
                    prediction_type: str) -> jax.Array:
    """Per-image loss weights of min-SNR-gamma (Hang et al. 2023); ones when gamma is 0.

    With SNR = abar / (1 - abar), the x0-space weight min(SNR, gamma) becomes min(SNR, gamma) / SNR
    for epsilon targets and min(SNR, gamma) / (SNR + 1) for v targets.
    """
    if gamma <= 0:
        return jnp.ones(timesteps.shape, jnp.float32)
    abar = alphas_cumprod[timesteps]
    snr = abar / (1 - abar)
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def sample_noise(key: jax.Array, shape: tuple[int, ...], offset: float) -> jax.Array:
    """Standard normal noise plus, if offset > 0, a per-image per-channel constant (offset noise), which
    lets the model learn to shift an image's mean brightness."""
    k_noise, k_offset = jax.random.split(key)
    noise = jax.random.normal(k_noise, shape)
    if offset > 0:
        noise = noise + offset * jax.random.normal(k_offset, (shape[0], 1, 1, shape[-1]))
    return noise


def weighted_mse(prediction: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over images of weight x mean squared error over each image, in float32."""
    per_image = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)),
                         axis=tuple(range(1, prediction.ndim)))
    return jnp.mean(per_image * weights)
