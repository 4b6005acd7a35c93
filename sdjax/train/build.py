"""The model a training run starts from: a diffusers checkpoint to fine-tune, or a preset from scratch."""

from __future__ import annotations

import os
import tempfile
import zlib

import jax
import jax.numpy as jnp
import ml_collections

import sdjax
from sdjax import storage
from sdjax.convert.diffusers import COMPONENTS, default_model_index, load_component
from sdjax.models import CLIPTextConfig, UNetConfig, VAEConfig
from sdjax.models.params import init_params
from sdjax.models.presets import preset
from sdjax.stable_diffusion import Model, StableDiffusion
from sdjax.tokenizer import load_tokenizer, write_bpe_tokenizer

# The noise schedule of Stable Diffusion's training (and a sampler config for the exported model).
SD_SCHEDULE = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
               "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
               "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


def build_model(model: ml_collections.ConfigDict, workdir: str) -> StableDiffusion:
    """The starting model (compute in model.dtype). Its `params` are the checkpoint's, as float32 host
    arrays; from scratch only those of earlier stages (the rest come from `initial_params`, which the
    trainer runs under jit with sharded outputs, so no device ever holds the whole model).

    From scratch see `scratch_components`: earlier stages' VAE and text encoder are loaded (and stay
    frozen), the rest starts random.
    """
    if model.pretrained:
        sd = sdjax.load(model.pretrained, dtype=jnp.dtype(model.dtype), param_dtype=jnp.float32,
                        attention_impl=model.attention_impl, to_device=False)
        return StableDiffusion(with_training_options(sd.model, model), sd.params)
    configs, params, tokenizer = scratch_components(model, workdir)
    return StableDiffusion(assemble(configs, model, tokenizers={"tokenizer": tokenizer},
                                    scheduler_config=dict(SD_SCHEDULE),
                                    model_index=default_model_index("DDIMScheduler")), params)


def scratch_components(model: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict, object]:
    """(typed configs of the three networks, host params of those read from earlier stages, tokenizer)
    for training from scratch: the preset's architecture, with the VAE from model.vae_from and the
    text encoder + tokenizer from model.text_encoder_from where given."""
    if not model.architecture:
        raise ValueError("model.pretrained is empty: give a diffusers folder to fine-tune "
                         "(--config.model.pretrained=PATH), or an architecture to train from scratch")
    architecture = preset(model.architecture)
    if set(architecture) != {"text_encoder", "vae", "unet"}:
        raise ValueError(f"model.architecture {model.architecture!r}: training from scratch builds SD-style models "
                         f"(one text encoder); fine-tune {model.architecture} from a checkpoint (model.pretrained)")
    configs, params = {}, {}
    if model.text_encoder_from:
        configs["text_encoder"], params["text_encoder"] = _stage_component(model.text_encoder_from, "text_encoder",
                                                                           "model.text_encoder_from")
        tokenizer = load_tokenizer(storage.join(model.text_encoder_from, "tokenizer"))
    else:
        tokenizer = scratch_tokenizer(model, workdir)
        configs["text_encoder"] = text_config(architecture, tokenizer)
    if model.vae_from:
        configs["vae"], params["vae"] = _stage_component(model.vae_from, "vae", "model.vae_from")
    else:
        configs["vae"] = VAEConfig.from_dict(architecture["vae"], "preset")
    configs["unet"] = UNetConfig.from_dict(architecture["unet"], "preset")
    return configs, params, tokenizer


def scratch_tokenizer(model: ml_collections.ConfigDict, workdir: str):
    """model.tokenizer (a folder), or a byte-level BPE without merges written to workdir/tokenizer (to a
    temporary folder when the workdir is in a bucket: the files only serve to build the tokenizer, which
    the export writes out itself)."""
    if model.tokenizer:
        return load_tokenizer(model.tokenizer)
    if storage.is_remote(workdir):
        with tempfile.TemporaryDirectory(prefix="sdjax-tokenizer-") as folder:
            return write_bpe_tokenizer(folder)
    return write_bpe_tokenizer(os.path.join(workdir, "tokenizer"))


def text_config(architecture: dict, tokenizer) -> CLIPTextConfig:
    """A preset's text tower sized to the tokenizer's vocabulary and EOS id."""
    raw = dict(architecture["text_encoder"], vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    return CLIPTextConfig.from_dict(raw, "preset")


def _stage_component(folder: str, name: str, key: str) -> tuple[object, dict]:
    if not storage.isdir(storage.join(folder, name)):
        raise ValueError(f"{key}: {folder} has no {name}/ folder (expected a trained stage's export)")
    return load_component(folder, name)


def assemble(configs: dict, model: ml_collections.ConfigDict, *, tokenizers: dict, scheduler_config: dict,
             model_index: dict) -> Model:
    """A Model from typed network configs (by component name), set up as `model` says."""
    kw = dict(dtype=jnp.dtype(model.dtype), param_dtype=jnp.float32, attention_impl=model.attention_impl)
    networks = {name: COMPONENTS[name].module_cls(config, **kw) for name, config in configs.items()}
    return with_training_options(Model(networks=networks, tokenizers=tokenizers, scheduler_config=scheduler_config,
                                       model_index=model_index), model)


def with_training_options(sd_model: Model, model: ml_collections.ConfigDict) -> Model:
    """`sd_model` with the config's prediction-type override and UNet remat applied."""
    if model.prediction_type:
        sd_model = sd_model.replace(scheduler_config={**sd_model.scheduler_config,
                                                      "prediction_type": model.prediction_type})
    if model.remat:
        sd_model = sd_model.with_networks(unet=sd_model.unet.clone(remat=True))
    return sd_model


def initial_params(networks: dict, seed: int) -> dict:
    """Random parameters of `networks` (name -> module) from `seed` (jittable). Each network's key
    comes from its name, so it does not depend on which other networks start from random."""
    root = jax.random.key(seed)
    return {name: init_params(module, jax.random.fold_in(root, zlib.crc32(name.encode())))
            for name, module in networks.items()}
