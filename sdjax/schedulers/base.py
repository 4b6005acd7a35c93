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
    sqrt_ab = np.sqrt(np.cumprod(1.0 - b, dtype=np.float64).astype(np.float32))  # as alphas_cumprod
    first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab ** 2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).astype(np.float32)


def alphas_cumprod(cfg: ScheduleConfig) -> np.ndarray:
    """alpha_bar_t = prod(1 - beta), float32.

    Accumulated in float64 like torch.cumprod on CPU: a float32 running product drifts ~1e-6 from it over
    1000 steps, enough to move Karras-respaced timesteps visibly.
    """
    return np.cumprod(1.0 - betas(cfg), dtype=np.float64).astype(np.float32)


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


def add_noise_vp(original, noise, alpha_prod):
    """sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise: the forward process of the alpha_bar families (img2img)."""
    return np.sqrt(alpha_prod) * original + np.sqrt(1 - alpha_prod) * noise


def train_sigmas(cfg: ScheduleConfig) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) at every training timestep, float32."""
    ac = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        ac[-1] = np.float32(2.0 ** -24)  # diffusers' sigma schedulers do this so the last sigma stays finite
    return ((1 - ac) / ac) ** 0.5


def sigma_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    """Timesteps, descending, float32 and unrounded for linspace: the spacing of the sigma (LMS/Euler) families."""
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps, dtype=np.float32)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        ratio = n // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.float32) + np.float32(cfg.steps_offset)
    return np.arange(n, 0, -n / num_steps).round().astype(np.float32) - np.float32(1)


def karras_sigmas(sigma_max: float, sigma_min: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: uniform in sigma^(1/rho) between the end points, float64."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + np.linspace(0, 1, num_steps) * (lo - hi)) ** rho


def exponential_sigmas(sigma_max: float, sigma_min: float, num_steps: int) -> np.ndarray:
    """Noise levels uniform in log sigma between the end points, float64."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def beta_sigmas(sigma_max: float, sigma_min: float, num_steps: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Noise levels at Beta(a, b) quantiles between the end points (Lee et al. 2024), float64."""
    from scipy import stats  # host-only precomputation; scipy is a dependency of jax

    return sigma_min + stats.beta.ppf(1 - np.linspace(0, 1, num_steps), a, b) * (sigma_max - sigma_min)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of `sigmas`, interpolating linearly in log sigma (float64)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    above = np.cumsum(log_sigma[None, :] - log_sigmas[:, None] >= 0, axis=0)
    low = above.argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def discrete_sigmas(cfg: ScheduleConfig, num_steps: int, sigma_min: float | None = None,
                    sigma_max: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps (N,), sigmas (N + 1,) ending in 0), both float32, as diffusers' discrete sigma samplers build them.

    Sigmas interpolate the training sigmas at sigma_timesteps; use_karras_sigmas / use_exponential_sigmas /
    use_beta_sigmas respace them between the same end points (or sigma_min / sigma_max when given) and map
    each back to a fractional timestep.
    """
    train = train_sigmas(cfg)
    timesteps = sigma_timesteps(cfg, num_steps)
    sigmas = np.interp(timesteps, np.arange(len(train)), train)
    respacings = {"use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas,
                  "use_beta_sigmas": beta_sigmas}
    chosen = [k for k in respacings if (cfg.use_karras_sigmas if k == "use_karras_sigmas" else cfg.get(k, False))]
    if len(chosen) > 1:
        raise ValueError(f"scheduler_config: only one of {', '.join(chosen)} can be true")
    if chosen:
        hi = float(sigmas[0]) if sigma_max is None else float(sigma_max)
        lo = float(sigmas[-1]) if sigma_min is None else float(sigma_min)
        sigmas = respacings[chosen[0]](hi, lo, num_steps)
        timesteps = sigma_to_t(sigmas, np.log(train))
    return timesteps.astype(np.float32), np.append(sigmas, 0.0).astype(np.float32)


def predicted_original(cfg: ScheduleConfig, model_output, sample, alpha_prod):
    """(x0, epsilon) implied by the model output under the config's prediction_type."""
    a, b = jnp.sqrt(alpha_prod), jnp.sqrt(1.0 - alpha_prod)
    if cfg.prediction_type == "epsilon":
        return (sample - b * model_output) / a, model_output
    if cfg.prediction_type == "sample":
        return model_output, (sample - a * model_output) / b
    return a * sample - b * model_output, a * model_output + b * sample


# ---- Option checks, multistep spacing and sigma-space helpers (Euler, Heun, DPM-Solver, UniPC) ----


def require_options(cfg: ScheduleConfig, family: str, **supported: tuple[Any, ...]) -> None:
    """Raises ValueError naming the key when a raw config option has a value this family does not implement."""
    raw = dict(cfg.raw)
    for key, allowed in supported.items():
        if key in raw and raw[key] not in allowed:
            raise ValueError(f"{family}: {key}={raw[key]!r} is not supported by sdjax "
                             f"(supported: {', '.join(repr(a) for a in allowed)})")


def multistep_timesteps(cfg: ScheduleConfig, num_steps: int, last_timestep: int | None = None) -> np.ndarray:
    """Integer timesteps of the multistep solvers (DPM-Solver, UniPC), descending.

    "linspace"/"leading" space num_steps + 1 points over [0, last_timestep) and drop the final 0, so
    these differ from leading_timesteps; last_timestep < num_train_timesteps clips the noisy end.
    """
    n = cfg.num_train_timesteps
    last = n if last_timestep is None else int(last_timestep)
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = last // (num_steps + 1)
        return (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    return np.arange(last, 0, -n / num_steps).round().astype(np.int64) - 1


def sigma_predicted_original(cfg: ScheduleConfig, model_output, sample, sigma, eps_sigma=None):
    """x0 implied by the model output for a sample x = x0 + sigma * noise (the model saw x / sqrt(sigma^2 + 1)).

    eps_sigma: the sigma to use for epsilon outputs when it differs (Euler's churned sigma_hat).
    """
    if cfg.prediction_type == "epsilon":
        return sample - (sigma if eps_sigma is None else eps_sigma) * model_output
    if cfg.prediction_type == "sample":
        return model_output
    return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)


def vp_alpha_sigma(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t)) of the variance-preserving process at each sigma, float32.

    A final sigma of 0 gives lambda = inf, which the solvers' coefficients turn into a plain x0 step.
    """
    s = np.asarray(sigmas, np.float32)
    with np.errstate(divide="ignore"):
        alpha = (np.float32(1) / np.sqrt(s ** 2 + np.float32(1))).astype(np.float32)
        sigma = (s * alpha).astype(np.float32)
        lam = (np.log(alpha) - np.log(sigma)).astype(np.float32)
    return alpha, sigma, lam


def vp_predicted_original(cfg: ScheduleConfig, model_output, sample, alpha, sigma):
    """x0 implied by the model output for x = alpha * x0 + sigma * noise, with alpha and sigma given
    directly (1 - alpha^2 would lose sigma's precision near sigma = 0)."""
    if cfg.prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if cfg.prediction_type == "sample":
        return model_output
    return alpha * sample - sigma * model_output


class SigmaSpaceMixin:
    """scale_model_input / add_noise / init_noise_sigma of samplers that move x = x0 + sigma * noise.

    Subclasses call _set_sigmas with one float32 sigma per loop index plus the final one.
    """

    cfg: ScheduleConfig
    sigmas: np.ndarray

    def _set_sigmas(self, sigmas: np.ndarray) -> None:
        self.sigmas = np.asarray(sigmas, np.float32)
        self._input_scale = np.sqrt(self.sigmas ** 2 + np.float32(1)).astype(np.float32)
        top = self.sigmas.max()
        # diffusers' rule: linspace/trailing start the noise at sigma_max, "leading" at sqrt(sigma_max^2 + 1)
        self.init_noise_sigma = float(top if self.cfg.timestep_spacing in ("linspace", "trailing")
                                      else np.sqrt(top ** 2 + np.float32(1)))

    def scale_model_input(self, state: Any, sample: jax.Array, i: jax.Array) -> jax.Array:
        """The model sees the variance-preserving input x / sqrt(sigma^2 + 1)."""
        return sample / jnp.asarray(self._input_scale)[i]

    def add_noise(self, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        return original + noise * self.sigmas[i]


class VPSigmaMixin:
    """scale_model_input / add_noise of multistep solvers that move the variance-preserving sample
    x = alpha_t * x0 + sigma_t * noise (DPM-Solver, UniPC). Subclasses set `sigmas` like SigmaSpaceMixin."""

    sigmas: np.ndarray
    init_noise_sigma = 1.0

    def scale_model_input(self, state: Any, sample: jax.Array, i: jax.Array) -> jax.Array:
        return sample

    def add_noise(self, original: jax.Array, noise: jax.Array, i: int) -> jax.Array:
        alpha, sigma, _ = vp_alpha_sigma(self.sigmas[i:i + 1])
        return alpha[0] * original + sigma[0] * noise


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
            keys: jax.Array | None = None, start: int = 0,
            post_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None, end: int | None = None,
            trace: Callable[..., jax.Array] | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Runs the scheduler from loop index `start` to `end` (default: the last step) as one lax.scan.

    model_fn(model_input, timestep) -> model output. `keys` (one per image) feed stochastic steps:
    step i draws per_image_normal(fold_in(key, i)). post_step(x, i) -> x, if given, edits the
    sample after each step (inpainting's blending); the scheduler state keeps its own copy, as
    diffusers' schedulers do. trace(model_input, model_output, new_sample, i) -> an array, if given,
    is what the scan emits at every step: the result is then (latents, the emitted arrays stacked on a
    leading step axis).
    """
    state = scheduler.init(latents)
    timesteps = jnp.asarray(scheduler.timesteps)

    def body(carry, i):
        state, x = carry
        model_input = scheduler.scale_model_input(state, x, i)
        output = model_fn(model_input, timesteps[i])
        noise = None
        if scheduler.needs_noise:
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
            noise = per_image_normal(step_keys, x.shape[1:], x.dtype)
        state, x = scheduler.step(state, output, i, x, noise)
        if post_step is not None:
            x = post_step(x, i)
        return (state, x), (None if trace is None else trace(model_input, output, x, i))

    indices = jnp.arange(start, len(scheduler.timesteps) if end is None else end)
    (_, latents), traced = jax.lax.scan(body, (state, latents), indices)
    return latents if trace is None else (latents, traced)
