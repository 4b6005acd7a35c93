"""The model a training run starts from: a diffusers checkpoint to fine-tune, or a preset from scratch."""

from __future__ import annotations

import copy
import os

import jax
import jax.numpy as jnp
import ml_collections

import sdjax
from sdjax.convert.diffusers import default_model_index
from sdjax.models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig, VAEConfig
from sdjax.models.params import init_params
from sdjax.models.presets import PRESETS
from sdjax.stable_diffusion import StableDiffusion
from sdjax.tokenizer import load_tokenizer, write_bpe_tokenizer

# The noise schedule of Stable Diffusion's training (and a sampler config for the exported model).
SD_SCHEDULE = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
               "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
               "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


def build_model(model: ml_collections.ConfigDict, workdir: str) -> StableDiffusion:
    """The starting model (compute in model.dtype). Its `params` are the checkpoint's, as float32 host
    arrays, or empty from scratch (see `initial_params`, which the trainer runs under jit with
    sharded outputs, so no device ever holds the whole model).

    From scratch, the tokenizer is model.tokenizer (a folder) or a byte-level BPE written to
    workdir/tokenizer.
    """
    if model.pretrained:
        sd = sdjax.load(model.pretrained, dtype=jnp.dtype(model.dtype), param_dtype=jnp.float32,
                        attention_impl=model.attention_impl, to_device=False)
    else:
        if not model.architecture:
            raise ValueError("model.pretrained is empty: give a diffusers folder to fine-tune "
                             "(--config.model.pretrained=PATH), or an architecture to train from scratch")
        if model.architecture not in PRESETS:
            raise ValueError(f"model.architecture {model.architecture!r} is unknown; known: {', '.join(PRESETS)}")
        tokenizer = (load_tokenizer(model.tokenizer) if model.tokenizer
                     else write_bpe_tokenizer(os.path.join(workdir, "tokenizer")))
        preset = copy.deepcopy(PRESETS[model.architecture])
        preset["text_encoder"].update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
        configs = {"text_encoder": CLIPTextConfig.from_dict(preset["text_encoder"], "preset"),
                   "vae": VAEConfig.from_dict(preset["vae"], "preset"),
                   "unet": UNetConfig.from_dict(preset["unet"], "preset")}
        return assemble(configs, model, tokenizer=tokenizer, scheduler_config=dict(SD_SCHEDULE),
                        model_index=default_model_index("DDIMScheduler"))
    return with_training_options(sd, model)


def assemble(configs: dict, model: ml_collections.ConfigDict, *, tokenizer, scheduler_config: dict,
             model_index: dict) -> StableDiffusion:
    """A StableDiffusion without parameters from the three typed configs, set up as `model` says."""
    kw = dict(dtype=jnp.dtype(model.dtype), param_dtype=jnp.float32, attention_impl=model.attention_impl)
    sd = StableDiffusion(tokenizer=tokenizer, text_encoder=CLIPTextModel(configs["text_encoder"], **kw),
                         vae=AutoencoderKL(configs["vae"], **kw), unet=UNet2DConditionModel(configs["unet"], **kw),
                         params={}, scheduler_config=scheduler_config, model_index=model_index)
    return with_training_options(sd, model)


def with_training_options(sd: StableDiffusion, model: ml_collections.ConfigDict) -> StableDiffusion:
    """Applies the config's prediction-type override and UNet remat."""
    if model.prediction_type:
        sd.scheduler_config = dict(sd.scheduler_config, prediction_type=model.prediction_type)
    if model.remat:
        sd.unet = sd.unet.clone(remat=True)
    return sd


def initial_params(sd: StableDiffusion, seed: int) -> dict:
    """Random parameters of the three networks from `seed` (jittable)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    return {name: init_params(module, key) for (name, module), key in zip(sd.networks.items(), keys)}
