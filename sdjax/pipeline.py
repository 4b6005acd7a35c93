"""Text-to-image, image-to-image and inpainting as one jitted program per shape.

    tokenize -> text encoder (prompt and negative prompt) -> lax.scan over the scheduler's steps
    (one UNet call on the doubled batch for classifier-free guidance) -> VAE decode

Everything that varies between calls of the same shape (prompts, seeds, guidance scale, initial
latents, init images) is an argument of the compiled program, so it compiles once per
(scheduler, steps, batch, size, mode). Image i's randomness comes from its own seed only:
its key is seed_key(seed_i), split by purpose (STREAMS), so an image does not depend on
the batch it is generated in.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import storage
from sdjax.conditioning import (PROMPT_SYNTAXES, MicroConditioning, encode_text, takes_added_conditions, time_ids,
                                tokenize_prompts, unet_call, uses_aesthetic_score, zeroes_empty_prompts)
from sdjax.lora import resolve
from sdjax.previews import Preview, approx_rgb, check_preview, fit_approx_decoder, preview_positions, tracer
from sdjax.schedulers import Scheduler, denoise, make_scheduler, per_image_normal
from sdjax.seeds import SEED_LIMIT, check_seed, seed_key

# fold_in tags of the per-image random streams.
STREAMS = {"latents": 0, "steps": 1, "posterior": 2, "masked_posterior": 3}
MODES = ("txt2img", "img2img", "inpaint")


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (default: $SDJAX_CACHE_DIR or ~/.cache/sdjax/xla).

    A gs:// (or other fsspec) URL is a cache every host of a slice shares: jax reads and writes it
    through etils' epath, which reaches stores through fsspec."""
    path = path or os.environ.get("SDJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sdjax", "xla")
    if storage.is_remote(path):
        storage.check_writable(path, "compilation cache ($SDJAX_CACHE_DIR)")
    else:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


class SamplingError(RuntimeError):
    """A sampling call ran but its result is not usable (e.g. non-finite images)."""


def image_keys(seeds: Sequence[int]) -> jax.Array:
    """One PRNG key per image."""
    return jnp.stack([seed_key(s) for s in seeds])


def stream(keys: jax.Array, name: str) -> jax.Array:
    """The per-image keys of one random stream."""
    return jax.vmap(lambda k: jax.random.fold_in(k, STREAMS[name]))(keys)


def initial_noise(seeds: Sequence[int], latent_shape: tuple[int, int, int], name: str = "latents") -> np.ndarray:
    """The Gaussian draws (N, h, w, C) of stream `name` that `generate` uses for these seeds."""
    return np.asarray(per_image_normal(stream(image_keys(seeds), name), latent_shape))


def guided(unet_fn: Callable, cond: Any, uncond: Any | None, guidance_scale: jax.Array,
           guidance_rescale: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """model_fn(x, t) with classifier-free guidance: one UNet call on [uncond; cond]. `cond` and
    `uncond` are the UNet's conditioning (a Conditioning, or any pytree of per-image arrays)."""
    if uncond is None:
        return lambda x, t: unet_fn(x, t, cond)
    context = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)

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
    start: int           # first loop index (img2img and inpainting skip the noisiest steps)
    mode: str            # one of MODES
    end: int | None = None  # loop index to stop before (denoising_end); None: run to the end
    add_noise: bool = True      # img2img noises its init latents to the start step (not at a hand-off)
    zero_negative: bool = False  # SDXL's force_zeros_for_empty_prompt: zero unconditional embeddings
    output: str = "images"       # "images", or "latents" (scaled, undecoded: a hand-off to a refiner)
    preview: Preview | None = None  # step-by-step previews emitted by the scan (sdjax.previews)


def noise_coefficients(sched: Scheduler) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) per loop index with add_noise(x, n, i) == a[i] x + b[i] n, plus a final (1, 0).

    Every scheduler's forward process is linear in (x, n), so the coefficients are read off on the
    host once and indexed inside the scan instead of calling add_noise with a traced index.
    """
    steps = range(len(sched.timesteps))
    a = [float(sched.add_noise(np.float64(1), np.float64(0), i)) for i in steps] + [1.0]
    b = [float(sched.add_noise(np.float64(0), np.float64(1), i)) for i in steps] + [0.0]
    return np.asarray(a, np.float32), np.asarray(b, np.float32)


def build_program(model, plan: Plan, sched: Scheduler) -> Callable:
    """The jitted sampling program for one Plan."""
    unet, vae = model.unet, model.vae
    scale = vae.config.scaling_factor
    conditioned_unet = unet.config.in_channels > vae.config.latent_channels  # 9-channel inpainting UNet

    # diffusers' rule: a float16 VAE whose config sets force_upcast (SD's and SDXL's: their activations
    # overflow float16) encodes and decodes in float32. bfloat16 has float32's range and is left as is.
    upcast = jnp.dtype(vae.dtype) == jnp.float16 and vae.config.force_upcast
    coder = vae.clone(dtype=jnp.float32) if upcast else vae

    def vae_apply(params, x, method):
        weights = jax.tree.map(lambda w: w.astype(jnp.float32), params["vae"]) if upcast else params["vae"]
        return coder.apply({"params": weights}, x.astype(jnp.float32) if upcast else x, method=method)

    def encode(params, images, keys, name):
        """Scaled posterior samples of images in [-1, 1]."""
        mean, logvar = vae_apply(params, images, "encode")
        eps = per_image_normal(stream(keys, name), mean.shape[1:], mean.dtype)
        return (mean + jnp.exp(0.5 * logvar) * eps) * scale

    def program(params, guidance_scale, inputs):
        """inputs: per-image arrays: ids, neg_ids (dicts by batch key), keys, noise; init_images, masks,
        init_latents for the modes that take them; time_ids, neg_time_ids for SDXL's UNets."""
        params = resolve(params)  # run-time LoRAs (sdjax.lora) added to the weights they change
        keys, noise = inputs["keys"], inputs["noise"]
        init_images, masks = inputs.get("init_images"), inputs.get("masks")
        cond = encode_text(model, params, inputs["ids"])._replace(time_ids=inputs.get("time_ids"))
        uncond = None
        if plan.guided:
            uncond = encode_text(model, params, inputs["neg_ids"])._replace(time_ids=inputs.get("neg_time_ids"))
            if plan.zero_negative:
                uncond = uncond._replace(context=jnp.zeros_like(uncond.context),
                                         pooled=None if uncond.pooled is None else jnp.zeros_like(uncond.pooled))
        extra = None
        if plan.mode == "inpaint":
            keep = (masks < 0.5).astype(init_images.dtype)[..., None]
            latent_mask = 1 - keep[:, ::vae.config.downscale, ::vae.config.downscale]  # nearest downsampling
            if conditioned_unet:
                masked = encode(params, (init_images * 2 - 1) * keep, keys, "masked_posterior")
                extra = jnp.concatenate([latent_mask, masked], axis=-1)

        call = unet_call(model, params)

        def unet_fn(x, t, cond):
            if extra is not None:  # the doubled CFG batch gets the same mask channels twice
                x = jnp.concatenate([x, jnp.tile(extra, (x.shape[0] // extra.shape[0], 1, 1, 1))], axis=-1)
            return call(x, t, cond)

        model_fn = guided(unet_fn, cond, uncond, guidance_scale, plan.guidance_rescale)
        post_step = None
        if plan.mode == "txt2img":
            latents = noise * sched.init_noise_sigma
        else:
            init = (inputs["init_latents"] if "init_latents" in inputs
                    else encode(params, init_images * 2 - 1, keys, "posterior"))
            if plan.mode == "inpaint" and plan.start == 0:  # strength 1: pure noise, as diffusers does
                latents = noise * sched.init_noise_sigma
            elif plan.add_noise:
                latents = sched.add_noise(init, noise, plan.start)
            else:  # a hand-off: the latents are already at the start step's noise level
                latents = init
            if plan.mode == "inpaint" and not conditioned_unet:
                # Regular UNet: after each step, put back the kept region noised to the next step's level.
                a, b = (jnp.asarray(c) for c in noise_coefficients(sched))

                def blend(x, i):
                    return latent_mask * x + (1 - latent_mask) * (a[i + 1] * init + b[i + 1] * noise)

                post_step = blend

        def decode(latents):
            images = (vae_apply(params, latents / scale, "decode").astype(jnp.float32) + 1) / 2
            # Non-finite values become NaN, which clipping keeps (it would turn +inf into a white pixel), so
            # the host can refuse the image instead of writing it.
            return jnp.clip(jnp.where(jnp.isfinite(images), images, jnp.nan), 0, 1)

        trace = None if plan.preview is None else tracer(sched, plan.preview.kind, noise_coefficients(sched))
        latents = denoise(sched, model_fn, latents, stream(keys, "steps"), plan.start, post_step, plan.end, trace)
        if trace is not None:
            latents, traced = latents
        out = jnp.where(jnp.isfinite(latents), latents, jnp.nan) if plan.output == "latents" else decode(latents)
        if trace is None:
            return out
        picked = traced[preview_positions(plan.preview.every, traced.shape[0])]  # (P, N, h, w, C)
        if plan.preview.decoder == "vae":
            previews = jax.lax.map(decode, picked)  # one batch decoded at a time
        else:
            previews = approx_rgb(picked, inputs["approx"], vae.config.downscale)
        return out, jnp.swapaxes(previews, 0, 1)  # (N, P, H, W, 3)

    return jax.jit(program)


def _check_images(name: str, value: np.ndarray | None, shape: tuple[int, ...], what: str) -> np.ndarray | None:
    if value is None:
        return None
    value = np.asarray(value, np.float32)
    if value.shape != shape:
        raise ValueError(f"{name} has shape {value.shape}; expected {shape} ({what})")
    return value


# Compiled sampling programs by Model (dropped with it), then by what they are specialised to.
_PROGRAMS: "weakref.WeakKeyDictionary[Any, dict[tuple, Callable]]" = weakref.WeakKeyDictionary()


def program_for(model, plan: Plan, sched: Scheduler, mesh: Any = None, rules: Any = None) -> Callable:
    """The compiled sampling program of `model` for `plan` (under `mesh`/`rules`), built once and cached."""
    programs = _PROGRAMS.setdefault(model, {})
    key = (plan, mesh, rules)
    if key not in programs:
        programs[key] = build_program(model, plan, sched)
    return programs[key]


def generate(model, params: Mapping[str, Any], prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
             *, num_steps: int = 50, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
             scheduler: str | None = None, scheduler_options: dict[str, Any] | None = None, height: int | None = None,
             width: int | None = None, seed: int | Sequence[int] = 0, latents: np.ndarray | None = None,
             init_image: np.ndarray | None = None, strength: float | None = None, mask: np.ndarray | None = None,
             init_latents: np.ndarray | None = None, denoising_start: float | None = None,
             denoising_end: float | None = None, output: str = "images", micro: MicroConditioning | None = None,
             negative_micro: MicroConditioning | None = None, prompt_syntax: str = "plain",
             preview_every: int | None = None, preview: str = "x0", preview_decoder: str = "vae", mesh: Any = None,
             rules: Any = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) float32 in [0, 1], one per prompt, from `model` (a sdjax.Model) with `params`.
    Raises ValueError for bad arguments (before any compute) and SamplingError if an image comes out
    non-finite.

    Args:
      prompts / negative_prompts: one negative per prompt (default: the empty prompt).
      num_steps: scheduler steps; guidance_scale <= 1 skips the unconditional pass.
      guidance_rescale: Lin et al. 2023 rescaling (0 = off).
      scheduler: a name from sdjax.schedulers.SCHEDULERS; default: the checkpoint's own.
      scheduler_options: family options, e.g. {"eta": 0.5} for DDIM.
      height / width: multiples of 8; default: the UNet's sample_size x the VAE factor.
      seed: image i uses seed + i (or give one seed per image), integers in [0, 2**64); an
        image's result does not depend on the other images in the batch.
      latents: initial noise (N, H/8, W/8, 4), NHWC, instead of the seeded draw.
      init_image: img2img / inpainting source (N, H, W, 3) in [0, 1].
      strength: in (0, 1], how much of the schedule is run from the noised init_image
        (default 0.8 for img2img; 1.0 for inpainting, which then starts from pure noise).
      mask: inpainting mask (N, H, W) or (N, H, W, 1), binarised at 0.5: 1 = repaint, 0 = keep.
        A regular UNet blends the kept region back after every step; a 9-channel inpainting
        UNet gets the mask and the masked image's latents as extra input channels.
      init_latents: img2img from scaled latents (N, H/8, W/8, 4) instead of an image, e.g. a base
        model's output="latents" for a refiner.
      denoising_end / denoising_start: in (0, 1), SDXL's base -> refiner hand-off (diffusers' meaning):
        the base stops (with output="latents") once the timesteps fall below the cutoff, the refiner
        starts there from init_latents without adding noise (strength is then ignored).
      output: "images", or "latents": the scaled latents, undecoded.
      micro / negative_micro: SDXL's size and crop conditioning (sdjax.conditioning.MicroConditioning)
        of the prompt and of the negative side; defaults as diffusers'. Only for UNets that take it.
      negative_prompts None on a model whose model_index.json sets force_zeros_for_empty_prompt (SDXL)
        gives zero unconditional embeddings, as diffusers does; [""] * N encodes the empty prompt.
      prompt_syntax: "plain" (the text as written, one window) or "a1111": A1111's (word:1.3) / [word]
        weighting, BREAK and prompts longer than one window (sdjax.prompt_syntax). In "a1111" every
        prompt and negative of the call is padded with empty windows to the largest window count among
        them, so an image depends on the others' lengths only through that count.
      preview_every: K returns (images, previews) with previews (N, P, H, W, 3) in [0, 1]: one image every K
        steps of the loop (after steps K, 2K, ...; a second-order scheduler counts each model call), from
        the same scan (sdjax.previews). preview: "x0" (the predicted clean image, A1111's live preview)
        or "latents" (the noisy latents after the step, diffusers' callback_on_step_end);
        preview_decoder: "vae" (exact) or "approx" (a fitted linear latent -> RGB map, nearly free).
      mesh / rules: run with the image batch split over the mesh's batch axes (its size must divide
        the batch), `params` placed on it as StableDiffusion.shard places them.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: empty list; give at least one prompt")
    n = len(prompts)
    # SDXL's force_zeros_for_empty_prompt: no negative prompt at all means zero unconditional embeddings.
    zero_negative = negative_prompts is None and zeroes_empty_prompts(model)
    negative_prompts = [""] * n if negative_prompts is None else list(negative_prompts)
    if len(negative_prompts) != n:
        raise ValueError(f"negative_prompts: {len(negative_prompts)} given for {n} prompts")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax {prompt_syntax!r} is unknown; known: {', '.join(PROMPT_SYNTAXES)}")
    for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale),
                        ("strength", strength), ("denoising_start", denoising_start),
                        ("denoising_end", denoising_end)):
        if value is not None and not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    if not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if output not in ("images", "latents"):
        raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
    factor = model.vae.config.downscale
    default_side = model.unet.config.sample_size * factor
    height, width = height or default_side, width or default_side
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
    seeds = ([check_seed(seed) + i for i in range(n)] if isinstance(seed, (int, np.integer))
             else [check_seed(s) for s in seed])
    if len(seeds) != n:
        raise ValueError(f"seed: {len(seeds)} seeds given for {n} prompts")
    if max(seeds) >= SEED_LIMIT:
        raise ValueError(f"seed {seed} + {n - 1} images is out of range: seeds are integers in [0, 2**64)")
    latent_shape = (height // factor, width // factor, model.vae.config.latent_channels)

    if init_image is not None and init_latents is not None:
        raise ValueError("init_image and init_latents both given; give one")
    mode = ("inpaint" if mask is not None else
            "img2img" if init_image is not None or init_latents is not None else "txt2img")
    if mode == "inpaint" and init_image is None:
        raise ValueError("mask given without init_image; inpainting needs both")
    if denoising_start is not None and mode == "txt2img":
        raise ValueError("denoising_start given without init_latents or init_image to start from")
    if model.unet.config.in_channels != latent_shape[-1] and mode != "inpaint":
        raise ValueError(f"this UNet takes {model.unet.config.in_channels} input channels (an inpainting model); "
                         "give init_image and mask")
    init_image = _check_images("init_image", init_image, (n, height, width, 3), "N, height, width, RGB in [0, 1]")
    init_latents = _check_images("init_latents", init_latents, (n,) + latent_shape,
                                 "N, height/8, width/8, C: scaled latents, as output='latents' returns them")
    if mask is not None and np.ndim(mask) == 4 and np.shape(mask)[-1] == 1:
        mask = np.asarray(mask)[..., 0]
    mask = _check_images("mask", mask, (n, height, width), "N, height, width; 1 = repaint, 0 = keep")
    sched = make_scheduler(scheduler, model.scheduler_config, num_steps, **(scheduler_options or {}))
    start, end = 0, None
    train_steps = int(model.scheduler_config.get("num_train_timesteps", 1000))
    if denoising_start is not None:  # a hand-off: start where the earlier model stopped, add no noise
        start = first_step_after(sched, train_steps, denoising_start)
    elif mode != "txt2img":
        strength = (1.0 if mode == "inpaint" else 0.8) if strength is None else strength
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        run_steps = min(int(num_steps * strength), num_steps)
        if run_steps < 1:
            raise ValueError(f"strength {strength} with {num_steps} steps leaves no denoising step")
        start = (num_steps - run_steps) * sched.order
    if denoising_end is not None:
        end = steps_before(sched, train_steps, denoising_end)
    if start >= (len(sched.timesteps) if end is None else end):
        raise ValueError(f"denoising_start {denoising_start} / denoising_end {denoising_end} with {num_steps} steps "
                         "leave no denoising step")
    previewed = None
    if preview_every is not None:
        previewed = Preview(preview_every, preview, preview_decoder)
        check_preview(previewed, (len(sched.timesteps) if end is None else end) - start)
    if latents is None:
        latents = initial_noise(seeds, latent_shape)
    elif np.shape(latents) != (n,) + latent_shape:
        raise ValueError(f"latents has shape {np.shape(latents)}; expected {(n,) + latent_shape} (N, h, w, C)")

    # One tokenization of both sides, so that prompt and negative get the same number of windows.
    tokens = tokenize_prompts(model, prompts + negative_prompts, prompt_syntax)
    inputs = {"ids": {k: v[:n] for k, v in tokens.items()}, "neg_ids": {k: v[n:] for k, v in tokens.items()},
              "keys": image_keys(seeds),
              "noise": np.asarray(latents, np.float32), "init_images": init_image, "masks": mask,
              "init_latents": init_latents}
    inputs.update(_time_ids(model, n, height, width, micro, negative_micro))
    if previewed is not None and previewed.decoder == "approx":
        inputs["approx"] = fit_approx_decoder(model, params)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    plan = Plan(scheduler or "", num_steps, tuple(sorted((scheduler_options or {}).items())), n,
                latent_shape[:2], guidance_scale > 1, float(guidance_rescale), start, mode, end,
                add_noise=denoising_start is None, zero_negative=zero_negative, output=output, preview=previewed)
    if mesh is not None and rules is None:
        from sdjax.parallel import DEFAULT_RULES

        rules = tuple(DEFAULT_RULES)
    program = program_for(model, plan, sched, mesh, rules)
    params = dict(params)
    from sdjax.parallel import activate, batch_divisor, batch_sharding, to_host

    if mesh is None:
        result = program(params, jnp.float32(guidance_scale), inputs)
    else:
        ways = batch_divisor(mesh, rules)
        if n % ways:
            raise ValueError(f"{n} images cannot be split evenly over the {ways} ways the mesh splits the batch")
        approx = inputs.pop("approx", None)  # the preview map is shared, not per image
        inputs = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, rules, x.ndim)), inputs)
        if approx is not None:
            inputs["approx"] = approx
        with activate(mesh, rules):
            result = program(params, jnp.float32(guidance_scale), inputs)
    if previewed is None:
        return _finite(to_host(result), seeds)
    images, previews = result
    return _finite(to_host(images), seeds), to_host(previews)


def _cutoff(total: int, fraction: float) -> int:
    """diffusers' denoising_start/end threshold: the training timestep a fraction of the way to clean."""
    return int(round(total - fraction * total))


def first_step_after(sched: Scheduler, total: int, denoising_start: float) -> int:
    """The loop index where a hand-off at `denoising_start` resumes: the first timestep below the cutoff
    (for second-order schedulers, the first of a pair, as diffusers counts it)."""
    timesteps = np.asarray(sched.timesteps)
    remaining = int(np.sum(timesteps < _cutoff(total, denoising_start)))
    if sched.order == 2 and remaining % 2 == 0:
        remaining += 1
    return len(timesteps) - remaining


def steps_before(sched: Scheduler, total: int, denoising_end: float) -> int:
    """The loop index where a run with `denoising_end` stops: the timesteps at or above the cutoff."""
    return int(np.sum(np.asarray(sched.timesteps) >= _cutoff(total, denoising_end)))


def _time_ids(model, n: int, height: int, width: int, micro: MicroConditioning | None,
              negative_micro: MicroConditioning | None) -> dict[str, np.ndarray]:
    """SDXL's time ids of both sides of guidance, per image; {} for a UNet without them. The negative
    side defaults as diffusers' do: the positive ids (base), or the same sizes with crop (0, 0) and
    aesthetic score 2.5 (refiner)."""
    if not takes_added_conditions(model):
        if micro is not None or negative_micro is not None:
            raise ValueError("micro / negative_micro: this model's UNet takes no size or crop conditioning "
                             "(only SDXL's does)")
        return {}
    micro = micro or MicroConditioning()
    ids = time_ids(model, micro, height, width)
    if negative_micro is None:
        negative = (dataclasses.replace(micro, crops_coords_top_left=(0, 0), aesthetic_score=2.5)
                    if uses_aesthetic_score(model) else None)
    else:
        negative = negative_micro
    neg_ids = ids if negative is None else time_ids(model, negative, height, width, "negative_")
    return {"time_ids": np.tile(ids, (n, 1)), "neg_time_ids": np.tile(neg_ids, (n, 1))}


def _finite(images: np.ndarray, seeds: list[int]) -> np.ndarray:
    """`images`, or SamplingError naming the images that hold NaN (non-finite values, see build_program)."""
    bad = [i for i, image in enumerate(images) if np.isnan(image).any()]
    if bad:
        raise SamplingError(f"sampling produced non-finite values (NaN/inf) in {len(bad)} of {len(images)} images "
                            f"(seeds {', '.join(str(seeds[i]) for i in bad[:8])}{', ...' if len(bad) > 8 else ''}); "
                            "the model's weights or the settings (guidance, dtype) overflow")
    return images
