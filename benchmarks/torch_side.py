"""The diffusers/PyTorch side of each measurement: eager modules under torch.inference_mode (training: autograd),
on the same checkpoint and inputs as the sdjax side. Returns the seconds of the timed calls and the items
(images, or UNet latents) per call."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from benchmarks.inputs import PROMPT, added_inputs, decoder_latents, training_pixels, unet_inputs
from benchmarks.settings import PEAK_MATMUL_REPEATS, PEAK_MATMUL_SIDE, Settings
from benchmarks.timing import time_calls

EMA_DECAY = 0.9999  # as sdjax's training config, so both steps do the same work
# cuDNN picks the fastest convolution algorithm per shape, as XLA autotunes sdjax's (no effect on CPU).
torch.backends.cudnn.benchmark = True


def _device(s: Settings) -> str:
    return "cuda" if s.device == "gpu" else "cpu"


def _dtype(s: Settings) -> torch.dtype:
    return getattr(torch, s.torch_dtype)


def _tensor(array: np.ndarray, s: Settings, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A numpy array from benchmarks.inputs on the device; 4-d ones go from NHWC to torch's NCHW."""
    if array.ndim == 4:
        array = array.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array)).to(_device(s), dtype or _dtype(s))


def _timed(fn: Callable[[], object], s: Settings) -> list[float]:
    def call():
        fn()
        if s.device == "gpu":  # CUDA kernels run asynchronously: wait for them
            torch.cuda.synchronize()

    return time_calls(call, s.warmup, s.repeats)


def unet(s: Settings) -> dict:
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(s.folder, subfolder="unet", dtype=_dtype(s))
    model = model.to(_device(s)).eval()
    latents, timesteps, context = unet_inputs(s, model.config.in_channels, model.config.cross_attention_dim)
    x, c = _tensor(latents, s), _tensor(context, s)
    t = torch.from_numpy(timesteps).to(_device(s))
    added = added_inputs(s, model.config)
    kwargs = {} if added is None else {"added_cond_kwargs": {"text_embeds": _tensor(added[0], s),
                                                             "time_ids": _tensor(added[1], s)}}
    with torch.inference_mode():
        seconds = _timed(lambda: model(x, t, encoder_hidden_states=c, **kwargs).sample, s)
    return {"seconds": seconds, "items": len(latents)}


def vae(s: Settings) -> dict:
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_pretrained(s.folder, subfolder="vae", dtype=_dtype(s)).to(_device(s)).eval()
    z = _tensor(decoder_latents(s, model.config.latent_channels), s)
    with torch.inference_mode():
        seconds = _timed(lambda: model.decode(z).sample, s)
    return {"seconds": seconds, "items": s.batch}


def _pipeline(s: Settings, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(s.folder, dtype=dtype).to(_device(s))  # SD or SDXL, as saved
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampling(s: Settings) -> dict:
    """The pipeline's own call (its scheduler is the checkpoint's DDIM), images returned as numpy."""
    pipe = _pipeline(s, _dtype(s))

    def run():
        generator = torch.Generator(_device(s)).manual_seed(0)
        return pipe([PROMPT] * s.batch, num_inference_steps=s.steps, guidance_scale=s.guidance,
                    height=s.resolution, width=s.resolution, output_type="np", generator=generator)

    with torch.inference_mode():
        seconds = _timed(run, s)
    return {"seconds": seconds, "items": s.batch}


def train(s: Settings) -> dict:
    """A diffusers-style UNet step doing what sdjax's step does: frozen VAE encode x scaling factor and text
    encoder, noise at uniform timesteps, UNet, MSE to the noise, backward, clipping at norm 1, AdamW (its
    defaults are sdjax's), EMA. Parameters in float32; a lower torch dtype runs under autocast."""
    from diffusers import DDPMScheduler

    device, compute = _device(s), _dtype(s)
    pipe = _pipeline(s, torch.float32)
    unet, vae, text_encoder = pipe.unet.train(), pipe.vae.requires_grad_(False), pipe.text_encoder.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ema = [p.detach().clone() for p in params]
    scaler = torch.amp.GradScaler(device, enabled=compute == torch.float16)  # float16 gradients need loss scaling
    autocast = lambda: torch.autocast(device, dtype=compute, enabled=compute != torch.float32)
    pixels = _tensor(training_pixels(s), s, torch.float32)
    ids = pipe.tokenizer([PROMPT] * s.batch, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)

    def step():
        with torch.no_grad(), autocast():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            context = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (s.batch,), device=device)
        with autocast():
            prediction = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps,
                              encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - EMA_DECAY)

    return {"seconds": _timed(step, s), "items": s.batch}


def peak(s: Settings, repeats: int = PEAK_MATMUL_REPEATS) -> dict:
    """FLOP/s of a large matmul in the torch dtype, measured as sdjax.flops.measured_peak_flops does."""
    side = PEAK_MATMUL_SIDE[s.device]
    a = torch.randn(side, side, generator=torch.Generator().manual_seed(0)).to(_device(s), _dtype(s))
    with torch.inference_mode():
        seconds = _timed(lambda: torch.matmul(a, a), dataclasses.replace(s, warmup=1, repeats=repeats))
    return {"flops_per_second": 2 * side ** 3 / min(seconds)}


def peak_device_bytes() -> int | None:
    """Peak bytes allocated on the GPU (None on CPU, where the process's peak RSS is used)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


MEASURES: dict[str, Callable[[Settings], dict]] = {
    "unet": unet, "sampling": sampling, "vae": vae, "train": train, "peak": peak}
