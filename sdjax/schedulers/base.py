"""What every scheduler shares: the noise schedule, timestep spacing, and the jittable loop.

A scheduler is a plain Python object built on the host for one number of steps. Everything it
precomputes (timesteps, alphas, sigmas, multistep coefficients) is a numpy table that becomes a
constant of the compiled program; what changes during sampling lives in a small `state` pytree.
The loop indexes the tables with the step number `i`, so the whole denoising loop is one
`jax.lax.scan` with no host callbacks.

Interface (see DDIM in ddim.py for the simplest complete one):
    timesteps            np.ndarray (L,)  the model timestep at each loop index (L >= num_steps for 2nd-order)
    order                int              model calls per num_steps entry (img2img slices at t_start * order)
    init_noise_sigma     float            initial latents = noise * init_noise_sigma
    needs_noise          bool             step() consumes fresh noise (ancestral/stochastic samplers)
    init(sample)                -> state
    scale_model_input(state, sample, i) -> model input
    step(state, model_output, i, sample, noise) -> (state, previous sample)
    add_noise(original, noise, i)       -> original noised to the level of loop index i (img2img)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "linspace", "trailing")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Options of diffusers' scheduler_config.json common to the families.

    Family-specific keys (solver_order, skip_prk_steps, ...) are read by each family from `raw`.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    use_karras_sigmas: bool = False
    raw: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "scheduler_config") -> "ScheduleConfig":
        """Typed view of a diffusers scheduler config; unknown values of known keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names}
        cfg = cls(**kwargs, raw=tuple(sorted((k, _hashable(v)) for k, v in raw.items())))
        for key, allowed in (("prediction_type", PREDICTION_TYPES), ("beta_schedule", BETA_SCHEDULES),
                             ("timestep_spacing", SPACINGS)):
            if getattr(cfg, key) not in allowed:
                raise ValueError(f"{source}: {key}={getattr(cfg, key)!r} is not supported "
                                 f"(supported: {', '.join(allowed)})")
        if raw.get("thresholding"):
            raise ValueError(f"{source}: thresholding=True is not supported by sdjax")
        return cfg

    def get(self, key: str, default: Any) -> Any:
        """A family-specific option from the raw config."""
        return dict(self.raw).get(key, default)


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def betas(cfg: ScheduleConfig) -> np.ndarray:
    """The training noise schedule beta_t, float32 as the reference computes it."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        b = np.asarray(cfg.trained_betas, np.float32)
    elif cfg.beta_schedule == "linear":
        b = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float32)
    elif cfg.beta_schedule == "scaled_linear":
        b = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=np.float32) ** 2
    else:  # squaredcos_cap_v2: the cosine schedule of Nichol & Dhariwal, each beta capped at 0.999
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        b = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
    if cfg.rescale_betas_zero_snr:
        b = _rescale_zero_terminal_snr(b)
    return b


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - b, dtype=np.float32))
    first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab ** 2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).astype(np.float32)


def alphas_cumprod(cfg: ScheduleConfig) -> np.ndarray:
    """alpha_bar_t = prod(1 - beta), float32."""
    return np.cumprod(1.0 - betas(cfg), dtype=np.float32)


def leading_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    """Integer timesteps, descending, by the config's timestep_spacing (DDIM/PNDM/DDPM convention)."""
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = n // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
    ratio = n / num_steps
    return (np.round(np.arange(n, 0, -ratio)) - 1).astype(np.int64)


def predicted_original(cfg: ScheduleConfig, model_output, sample, alpha_prod):
    """(x0, epsilon) implied by the model output under the config's prediction_type."""
    a, b = jnp.sqrt(alpha_prod), jnp.sqrt(1.0 - alpha_prod)
    if cfg.prediction_type == "epsilon":
        return (sample - b * model_output) / a, model_output
    if cfg.prediction_type == "sample":
        return model_output, (sample - a * model_output) / b
    return a * sample - b * model_output, a * model_output + b * sample


class Scheduler(Protocol):
    timesteps: np.ndarray
    order: int
    init_noise_sigma: float
    needs_noise: bool

    def init(self, sample: jax.Array) -> Any: ...
    def scale_model_input(self, state: Any, sample: jax.Array, i: jax.Array) -> jax.Array: ...
    def step(self, state: Any, model_output: jax.Array, i: jax.Array, sample: jax.Array,
             noise: jax.Array | None) -> tuple[Any, jax.Array]: ...
    def add_noise(self, original: jax.Array, noise: jax.Array, i: int) -> jax.Array: ...


def per_image_normal(keys: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """One standard-normal draw per image from its own key, so an image's noise ignores the batch."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def denoise(scheduler: Scheduler, model_fn: Callable[[jax.Array, jax.Array], jax.Array], latents: jax.Array,
            keys: jax.Array | None = None, start: int = 0) -> jax.Array:
    """Runs the scheduler from loop index `start` to the end as one lax.scan.

    model_fn(model_input, timestep) -> model output. `keys` (one per image) feed stochastic steps:
    step i draws per_image_normal(fold_in(key, i)).
    """
    state = scheduler.init(latents)
    timesteps = jnp.asarray(scheduler.timesteps)

    def body(carry, i):
        state, x = carry
        output = model_fn(scheduler.scale_model_input(state, x, i), timesteps[i])
        noise = None
        if scheduler.needs_noise:
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
            noise = per_image_normal(step_keys, x.shape[1:], x.dtype)
        state, x = scheduler.step(state, output, i, x, noise)
        return (state, x), None

    indices = jnp.arange(start, len(scheduler.timesteps))
    (_, latents), _ = jax.lax.scan(body, (state, latents), indices)
    return latents
