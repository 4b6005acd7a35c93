"""The sdjax side of each measurement, on the shared checkpoint. Each returns the seconds of its timed calls,
the items (images, or UNet latents) per call and, from XLA's cost analysis, the FLOPs per item, which the
torch side is credited with too (same model)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

import sdjax
from benchmarks.inputs import PROMPT, added_inputs, decoder_latents, training_pixels, unet_inputs
from benchmarks.settings import PEAK_MATMUL_REPEATS, PEAK_MATMUL_SIDE, Settings
from benchmarks.timing import time_calls
from sdjax.conditioning import abstract_conditioning, abstract_ids, encode_text, unet_call
from sdjax.convert.diffusers import COMPONENTS, load_component
from sdjax.flops import measured_peak_flops, traced_flops
from sdjax.host_memory import release_freed_heap
from sdjax.pipeline import enable_compilation_cache

# What a first call spends before running: tracing, lowering to MLIR, and XLA compilation (or, with a
# warm persistent cache, loading the executable, which jax reports under the compile event too).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def _component(s: Settings, name: str) -> tuple[Any, Any]:
    """One network and its parameters on the device (only what the measurement needs, for its peak memory)."""
    dtype = jnp.dtype(s.sdjax_dtype)
    config, params = load_component(s.folder, name, dtype=dtype, place=jnp.asarray)
    module = COMPONENTS[name].module_cls(config, dtype=dtype, param_dtype=dtype, attention_impl=s.attention_of(name))
    return module, params


def _pipeline(s: Settings, param_dtype: str | None = None) -> sdjax.StableDiffusion:
    """All three networks, computing in the sdjax dtype and storing in `param_dtype` (default: the same)."""
    dtype = jnp.dtype(s.sdjax_dtype)
    sd = sdjax.load(s.folder, dtype=dtype, param_dtype=jnp.dtype(param_dtype or dtype), attention_impl=s.attention)
    model = sd.model.with_networks(vae=sd.model.vae.clone(attention_impl=s.attention_of("vae")))
    return sdjax.StableDiffusion(model, sd.params)


def _time_compiled(compiled: Callable, args: tuple, s: Settings) -> list[float]:
    return time_calls(lambda: jax.block_until_ready(compiled(*args)), s.warmup, s.repeats)


def unet(s: Settings) -> dict:
    """One UNet forward on the guided batch (SDXL: with its pooled embedding and time ids)."""
    module, params = _component(s, "unet")
    latents, timesteps, context = unet_inputs(s, module.config.in_channels, module.config.cross_attention_dim)
    added = added_inputs(s, module.config) or ()
    args = (params, *(jnp.asarray(a) for a in (latents, timesteps, context, *added)))
    forward = lambda p, x, t, c, *extra: module.apply({"params": p}, x, t, c, *extra)
    compiled = jax.jit(forward).lower(*args).compile()
    flops = traced_flops(forward, *args)
    n = len(latents)
    return {"seconds": _time_compiled(compiled, args, s), "items": n, "flops_per_item": flops / n}


def vae(s: Settings) -> dict:
    """One VAE decode of a batch of latents."""
    module, params = _component(s, "vae")
    args = (params, jnp.asarray(decoder_latents(s, module.config.latent_channels)))
    decode = lambda p, z: module.apply({"params": p}, z, method="decode")
    compiled = jax.jit(decode).lower(*args).compile()
    return {"seconds": _time_compiled(compiled, args, s), "items": s.batch,
            "flops_per_item": traced_flops(decode, *args) / s.batch}


def _sampler(s: Settings) -> tuple[sdjax.StableDiffusion, Callable[[], Any]]:
    sd = _pipeline(s)
    return sd, lambda: sd.generate([PROMPT] * s.batch, num_steps=s.steps, guidance_scale=s.guidance,
                                   scheduler="ddim", height=s.resolution, width=s.resolution, seed=0)


def sampling_flops(sd: sdjax.StableDiffusion, s: Settings) -> float:
    """FLOPs of one generate call: text conditioning (prompt, negative) + steps x UNet on the guided batch +
    VAE decode. Counted from separately lowered pieces: XLA counts the sampling loop's body only once."""
    model, params = sd.model, dict(sd.params)
    guided = 2 if s.guidance > 1 else 1
    n, side = s.batch, s.latent_side
    text = traced_flops(lambda p, ids: encode_text(model, p, ids), params, abstract_ids(model, n))
    cond = abstract_conditioning(model, guided * n)
    step = traced_flops(lambda p, x, t, c: unet_call(model, p)(x, t, c), params,
                        jax.ShapeDtypeStruct((guided * n, side, side, model.unet.config.in_channels), jnp.float32),
                        jax.ShapeDtypeStruct((guided * n,), jnp.int32), cond)
    decode = traced_flops(lambda p, z: model.vae.apply({"params": p}, z, method="decode"), params["vae"],
                          jax.ShapeDtypeStruct((n, side, side, model.vae.config.latent_channels), jnp.float32))
    return guided * text + s.steps * step + decode


def sampling(s: Settings) -> dict:
    """Text to image with classifier-free guidance and DDIM, prompts in, images on the host out."""
    sd, run = _sampler(s)
    return {"seconds": time_calls(run, s.warmup, s.repeats), "items": s.batch,
            "flops_per_item": sampling_flops(sd, s) / s.batch}


def train(s: Settings) -> dict:
    """The project's UNet train step (frozen VAE encode and text encoder inside, AdamW, clipping, EMA);
    parameters and optimizer state in float32, compute in the sdjax dtype."""
    from sdjax.train.config import base_config
    from sdjax.train.optimizer import make_optimizer
    from sdjax.train.step import init_state, make_train_step

    config = base_config()
    config.batch_size = s.batch
    config.model.dtype = s.sdjax_dtype
    config.optimizer.warmup_steps = 0
    sd = _pipeline(s, param_dtype="float32")
    model = sd.model
    tx = make_optimizer(config.optimizer, config.total_steps)
    # Donated, so the state takes over the loaded buffers instead of holding a second copy of the model.
    state = jax.jit(lambda params: init_state(params, ("unet",), config, tx), donate_argnums=0)(dict(sd.params))
    del sd
    batch = {"pixels": jnp.asarray(training_pixels(s)),
             **{key: jnp.asarray(ids) for key, ids in model.tokenize([PROMPT] * s.batch).items()}}
    train_step = make_train_step(model, config, tx)
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
    release_freed_heap()  # as train.py does
    flops = traced_flops(train_step, state, batch)
    current = [state]

    def step():
        current[0], metrics = compiled(current[0], batch)
        jax.block_until_ready(metrics)

    return {"seconds": time_calls(step, s.warmup, s.repeats), "items": s.batch,
            "flops_per_item": flops / s.batch}


def compile_time(s: Settings) -> dict:
    """Seconds the first sampling call spends tracing, lowering and compiling with the persistent compilation
    cache in s.cache_dir (empty: a cold start; filled by an earlier process: a warm one)."""
    enable_compilation_cache(s.cache_dir)
    # The default 1 s threshold would skip the tiny preset's programs; cache every program so a warm run
    # is a cache hit at any model size.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    _, run = _sampler(s)
    spent, hits = [], []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: spent.append(secs) if event in COMPILE_EVENTS else None)
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    steady = statistics.median(time_calls(run, 0, s.repeats))
    return {"seconds": [sum(spent)], "items": 1, "first_call_minus_steady_s": first - steady,
            "cache_hits": len(hits)}


def peak(s: Settings) -> dict:
    """FLOP/s of a large matmul in the sdjax dtype: this framework's practical peak on the machine."""
    return {"flops_per_second": measured_peak_flops(s.sdjax_dtype, side=PEAK_MATMUL_SIDE[s.device],
                                                   repeats=PEAK_MATMUL_REPEATS)}


def peak_device_bytes() -> int | None:
    """Peak bytes allocated on the accelerator (None on CPU, where the process's peak RSS is used)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


MEASURES: dict[str, Callable[[Settings], dict]] = {
    "unet": unet, "sampling": sampling, "vae": vae, "train": train, "compile": compile_time, "peak": peak}
