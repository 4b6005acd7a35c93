"""Text-to-image and image-to-image sampling as one jitted program per shape.

    tokenize -> text encoder (prompt and negative prompt) -> lax.scan over the scheduler's steps
    (one UNet call on the doubled batch for classifier-free guidance) -> VAE decode

Everything that varies between calls of the same shape (prompts, seeds, guidance scale, initial
latents, init images) is an argument of the compiled program, so it compiles once per
(scheduler, steps, batch, size, mode). Image i's randomness comes from its own seed only:
its key is jax.random.key(seed_i), split by purpose (STREAMS), so an image does not depend on
the batch it is generated in.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers import Scheduler, denoise, make_scheduler, per_image_normal

# fold_in tags of the per-image random streams.
STREAMS = {"latents": 0, "steps": 1, "posterior": 2}


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (default: $SDJAX_CACHE_DIR or ~/.cache/sdjax/xla)."""
    path = path or os.environ.get("SDJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sdjax", "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def image_keys(seeds: Sequence[int]) -> jax.Array:
    """One PRNG key per image."""
    return jnp.stack([jax.random.key(int(s)) for s in seeds])


def stream(keys: jax.Array, name: str) -> jax.Array:
    """The per-image keys of one random stream."""
    return jax.vmap(lambda k: jax.random.fold_in(k, STREAMS[name]))(keys)


def initial_noise(seeds: Sequence[int], latent_shape: tuple[int, int, int], name: str = "latents") -> np.ndarray:
    """The Gaussian draws (N, h, w, C) of stream `name` that `generate` uses for these seeds."""
    return np.asarray(per_image_normal(stream(image_keys(seeds), name), latent_shape))


def guided(unet_fn: Callable, cond: jax.Array, uncond: jax.Array | None, guidance_scale: jax.Array,
           guidance_rescale: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """model_fn(x, t) with classifier-free guidance: one UNet call on [uncond; cond]."""
    if uncond is None:
        return lambda x, t: unet_fn(x, t, cond)
    context = jnp.concatenate([uncond, cond])

    def model_fn(x, t):
        out_uncond, out_cond = jnp.split(unet_fn(jnp.concatenate([x, x]), t, context), 2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
        if guidance_rescale > 0:  # Lin et al. 2023, sec. 3.4: match the std of the conditional prediction
            axes = tuple(range(1, out.ndim))
            rescaled = out * (jnp.std(out_cond, axis=axes, keepdims=True) / jnp.std(out, axis=axes, keepdims=True))
            out = guidance_rescale * rescaled + (1 - guidance_rescale) * out
        return out

    return model_fn


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static part of a sampling call: what one compiled program is specialised to."""

    scheduler: str
    num_steps: int
    options: tuple[tuple[str, Any], ...]
    batch: int
    latent_hw: tuple[int, int]
    guided: bool
    guidance_rescale: float
    start: int           # first loop index (img2img skips the noisiest steps)
    from_image: bool


def build_program(sd, plan: Plan, sched: Scheduler) -> Callable:
    """The jitted sampling program for one Plan."""
    text_encoder, unet, vae = sd.text_encoder, sd.unet, sd.vae
    scale = vae.config.scaling_factor

    def program(params, ids, neg_ids, keys, guidance_scale, noise, init_images):
        cond = text_encoder.apply({"params": params["text_encoder"]}, ids)[0]
        uncond = text_encoder.apply({"params": params["text_encoder"]}, neg_ids)[0] if plan.guided else None
        unet_fn = lambda x, t, ctx: unet.apply({"params": params["unet"]}, x, t, ctx)
        model_fn = guided(unet_fn, cond, uncond, guidance_scale, plan.guidance_rescale)
        if plan.from_image:
            mean, logvar = vae.apply({"params": params["vae"]}, init_images * 2 - 1, method="encode")
            eps = per_image_normal(stream(keys, "posterior"), mean.shape[1:], mean.dtype)
            init = (mean + jnp.exp(0.5 * logvar) * eps) * scale
            latents = sched.add_noise(init, noise, plan.start)
        else:
            latents = noise * sched.init_noise_sigma
        latents = denoise(sched, model_fn, latents, stream(keys, "steps"), plan.start)
        images = vae.apply({"params": params["vae"]}, latents / scale, method="decode")
        return jnp.clip((images.astype(jnp.float32) + 1) / 2, 0, 1)

    return jax.jit(program)


def generate(sd, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *, num_steps: int = 50,
             guidance_scale: float = 7.5, guidance_rescale: float = 0.0, scheduler: str | None = None,
             scheduler_options: dict[str, Any] | None = None, height: int | None = None, width: int | None = None,
             seed: int | Sequence[int] = 0, latents: np.ndarray | None = None, init_image: np.ndarray | None = None,
             strength: float = 0.8) -> np.ndarray:
    """Images (N, H, W, 3) float32 in [0, 1] for N prompts. See StableDiffusion.generate."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: empty list; give at least one prompt")
    n = len(prompts)
    negative_prompts = [""] * n if negative_prompts is None else list(negative_prompts)
    if len(negative_prompts) != n:
        raise ValueError(f"negative_prompts: {len(negative_prompts)} given for {n} prompts")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    factor = sd.vae.config.downscale
    default_side = sd.unet.config.sample_size * factor
    height, width = height or default_side, width or default_side
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
    seeds = [seed + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"seed: {len(seeds)} seeds given for {n} prompts")
    latent_shape = (height // factor, width // factor, sd.unet.config.in_channels)

    sched = make_scheduler(scheduler, sd.scheduler_config, num_steps, **(scheduler_options or {}))
    start = 0
    if init_image is not None:
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        init_image = np.asarray(init_image, np.float32)
        if init_image.shape != (n, height, width, 3):
            raise ValueError(f"init_image has shape {init_image.shape}; expected {(n, height, width, 3)} "
                             f"(N, height, width, RGB in [0, 1])")
        start = (num_steps - min(int(num_steps * strength), num_steps)) * sched.order
        if start >= len(sched.timesteps):
            raise ValueError(f"strength {strength} with {num_steps} steps leaves no denoising step")
    if latents is None:
        latents = initial_noise(seeds, latent_shape)
    elif np.shape(latents) != (n,) + latent_shape:
        raise ValueError(f"latents has shape {np.shape(latents)}; expected {(n,) + latent_shape} (N, h, w, C)")

    plan = Plan(scheduler or "", num_steps, tuple(sorted((scheduler_options or {}).items())), n,
                latent_shape[:2], guidance_scale > 1, float(guidance_rescale), start, init_image is not None)
    program = sd.programs.get(plan)
    if program is None:
        program = sd.programs[plan] = build_program(sd, plan, sched)
    images = program(sd.params, sd.tokenize(prompts), sd.tokenize(negative_prompts), image_keys(seeds),
                     jnp.float32(guidance_scale), jnp.asarray(latents, jnp.float32),
                     None if init_image is None else jnp.asarray(init_image))
    return np.asarray(images)
