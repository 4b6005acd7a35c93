"""Step-by-step previews: what the latents look like every K steps, emitted by the sampling scan itself.

Two things can be shown at a step (`kind`):
    "x0"       the clean latents the model predicts from that step's input (what A1111's live preview
               shows): x0 = (x - sqrt(1 - a) eps) / sqrt(a) in the variance-preserving form, for every
               scheduler, with a the step's alpha_bar and eps (or v) the guided model output
    "latents"  the noisy latents after the step (what diffusers' callback_on_step_end receives)

and decoded two ways (`decoder`): "vae", the model's own VAE decoder (exact, one decode per preview), or
"approx", a linear map from latent channels to RGB fitted to this model's VAE (`fit_approx_decoder`),
nearly free and blocky (one colour per latent pixel).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("x0", "latents")
DECODERS = ("vae", "approx")


@dataclasses.dataclass(frozen=True)
class Preview:
    """Previews every `every` denoising steps (loop steps: a second-order scheduler counts each model call)."""

    every: int
    kind: str = "x0"
    decoder: str = "vae"


def check_preview(preview: Preview, steps: int) -> None:
    """ValueError naming the setting unless `preview` fits a run of `steps` loop steps."""
    every = preview.every
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or not 1 <= every <= steps:
        raise ValueError(f"preview_every must be an integer in [1, {steps}] (the steps this call runs), got {every!r}")
    if preview.kind not in KINDS:
        raise ValueError(f"preview {preview.kind!r} is unknown; known: {', '.join(KINDS)}")
    if preview.decoder not in DECODERS:
        raise ValueError(f"preview_decoder {preview.decoder!r} is unknown; known: {', '.join(DECODERS)}")


def preview_positions(every: int, steps: int) -> np.ndarray:
    """The positions in a run of `steps` loop steps after which a preview is taken: every-th, 2*every-th, ..."""
    return np.arange(every - 1, steps, every)


def tracer(sched: Any, kind: str, coefficients: tuple[np.ndarray, np.ndarray]) -> Callable[..., jax.Array]:
    """trace(model_input, model_output, new_sample, i) for sdjax.schedulers.denoise, emitting `kind`.

    `coefficients` are (a, b) per loop index with the sample at i being a x0 + b noise
    (sdjax.pipeline.noise_coefficients), which give every scheduler's alpha_bar = a^2 / (a^2 + b^2).
    """
    from sdjax.schedulers.base import predicted_original

    if kind == "latents":
        return lambda model_input, output, x, i: x
    a, b = coefficients
    alpha_bar = jnp.asarray((a ** 2 / (a ** 2 + b ** 2)).astype(np.float32))

    def trace(model_input, output, x, i):
        x0, _ = predicted_original(sched.cfg, output.astype(jnp.float32), model_input.astype(jnp.float32),
                                   alpha_bar[i])
        if getattr(sched, "CLIPS_X0", False) and sched.cfg.clip_sample:  # the x0 such a scheduler steps with
            x0 = jnp.clip(x0, -sched.cfg.clip_sample_range, sched.cfg.clip_sample_range)
        return x0.astype(x.dtype)

    return trace


def approx_rgb(latents: jax.Array, matrix: jax.Array, factor: int) -> jax.Array:
    """Latents (..., h, w, C) -> RGB (..., h * factor, w * factor, 3) in [0, 1] by the fitted linear map
    `matrix` (C + 1, 3): one colour per latent pixel, repeated to the image's size."""
    rgb = jnp.einsum("...c,cd->...d", latents.astype(jnp.float32), matrix[:-1]) + matrix[-1]
    return jnp.clip(jnp.repeat(jnp.repeat(rgb, factor, axis=-3), factor, axis=-2), 0, 1)


# Fitted maps by Model (dropped with it).
_FITTED: "weakref.WeakKeyDictionary[Any, np.ndarray]" = weakref.WeakKeyDictionary()


def fit_approx_decoder(model, params: Mapping[str, Any], images: int = 128, size: int = 64) -> np.ndarray:
    """The least-squares linear map (C + 1, 3) from a latent pixel (scaled, plus a bias) to the mean colour
    of the factor x factor pixels it encodes, fitted on `images` random colour fields (2 x 2 flat blocks:
    previews are mostly flat regions, and blocks fit them better than smooth gradients did on the shipped
    model, mean error 0.14 against 0.21) encoded by `model`'s VAE (posterior means). A fixed calibration
    draw: the same model always gets the same map. Cached per model."""
    if model in _FITTED:
        return _FITTED[model]
    vae = model.vae.clone(dtype=jnp.float32)  # calibration in float32 whatever the model computes in (an
    factor = vae.config.downscale              # SD/SDXL VAE in float16 overflows; bfloat16 is coarse)
    rng = np.random.default_rng(20240101)  # calibration only: fixed so that previews are reproducible
    coarse = rng.uniform(0, 1, (images, 2, 2, 3)).astype(np.float32)
    fields = jax.image.resize(jnp.asarray(coarse), (images, size, size, 3), "nearest")
    weights = jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), params["vae"])
    mean, _ = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(weights, fields * 2 - 1)
    latents = np.asarray(mean, np.float64).reshape(-1, mean.shape[-1]) * vae.config.scaling_factor
    target = np.asarray(fields, np.float64).reshape(images, size // factor, factor, size // factor, factor, 3)
    target = target.mean(axis=(2, 4)).reshape(-1, 3)
    design = np.concatenate([latents, np.ones((len(latents), 1))], axis=1)
    matrix = np.linalg.lstsq(design, target, rcond=None)[0].astype(np.float32)
    _FITTED[model] = matrix
    return matrix
