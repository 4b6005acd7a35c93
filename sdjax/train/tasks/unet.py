"""Task "unet": latent diffusion on a frozen VAE and text encoder (fine-tuning a checkpoint, or from
scratch on the outputs of the earlier stages). Export: a whole diffusers folder."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import flax.linen as nn
from flax.traverse_util import flatten_dict
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdjax.conditioning import takes_added_conditions, tokenizer_fn, uses_aesthetic_score
from sdjax.data.latent_cache import check_cacheable, ensure_latent_cache
from sdjax.models.attention import resolved_impl
from sdjax.parallel import sync_processes, to_host
from sdjax.pipeline import generate
from sdjax.stable_diffusion import Model, save
from sdjax.train.build import build_model
from sdjax.train.checkpoint import fingerprint
from sdjax.train.objectives import diffusion_objective
from sdjax.train.tasks.task import EVAL_CHUNK, Task


def check(config: ml_collections.ConfigDict) -> None:
    if config.data.cache_latents:
        check_cacheable(config.data)


def trained(config: ml_collections.ConfigDict, model: Model) -> tuple[str, ...]:
    """The UNet, and with model.train_text_encoder every text encoder of `model` (SDXL: both)."""
    encoders = tuple(enc.encoder for enc in model.text) if config.model.train_text_encoder else ()
    return ("unet",) + encoders


def check_model(model: Model) -> None:
    """Refuses models this task cannot train, in one line."""
    if takes_added_conditions(model) and uses_aesthetic_score(model):
        raise ValueError("model.pretrained: an SDXL refiner (requires_aesthetics_score) conditions on a per-image "
                         "aesthetic score the training data does not carry; fine-tune the SDXL base instead")


def build(config: ml_collections.ConfigDict, workdir: str) -> Task:
    start = build_model(config.model, workdir)
    model = start.model
    check_model(model)

    def export(all_params: dict, folder: str) -> None:
        save(model, all_params, folder)

    def preview(all_params: dict) -> np.ndarray:
        side = config.data.resolution
        return generate(model, all_params, list(config.log.preview_prompts), num_steps=config.log.preview_steps,
                        guidance_scale=config.log.preview_guidance, height=side, width=side, seed=0)

    def prepare_data(frozen: dict) -> str:
        """data.cache_latents: the frozen VAE runs once over the split instead of in every step."""
        folder = os.path.join(workdir, "latent_cache")
        vae_params = to_host(frozen["vae"])  # a gather every process takes part in
        if jax.process_index() == 0:
            cache_latents(config, folder, model.vae, vae_params)
        sync_processes("latent cache ready")
        return folder

    names = trained(config, model)
    return Task(networks=dict(model.networks), params=dict(start.params), trained=names,
                objective=diffusion_objective(model, config), tokenize=tokenizer_fn(model),
                identity=fingerprint(model, names), export=export, preview=preview,
                prepare_data=prepare_data if config.data.cache_latents else None)


def params_digest(params: dict[str, Any]) -> str:
    """sha256 of a parameter tree: every leaf's name, dtype, shape and values."""
    digest = hashlib.sha256()
    for name, leaf in sorted(flatten_dict(params, sep="/").items()):
        array = np.ascontiguousarray(leaf)
        digest.update(f"{name} {array.dtype} {array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def cache_latents(config: ml_collections.ConfigDict, folder: str, vae: nn.Module, params: dict[str, Any]) -> None:
    """data.cache_latents: makes `folder` hold data.split encoded by the frozen `vae` with `params` (host
    arrays), reused while the VAE and the data are the ones that made it. Runs on this process's
    devices alone (in a multi-host run process 0 builds it while the others wait)."""
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("rows",))
    rows = NamedSharding(mesh, PartitionSpec("rows"))
    chunk = -(-EVAL_CHUNK // len(devices)) * len(devices)  # images per call, split over the devices
    placed = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    encode = jax.jit(lambda p, x: [m.astype(jnp.float32) for m in vae.apply({"params": p}, x, method="encode")])

    def encode_chunk(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        padded = np.zeros((chunk,) + pixels.shape[1:], np.float32)  # one program for every chunk, the last too
        padded[:len(pixels)] = pixels
        mean, logvar = jax.device_get(encode(placed, jax.device_put(padded, rows)))
        return mean[:len(pixels)], logvar[:len(pixels)]

    identity = {"vae_config": vae.config.to_dict(), "vae_dtype": jnp.dtype(vae.dtype).name,
                "vae_attention_impl": resolved_impl(vae.attention_impl), "vae_params_sha256": params_digest(params)}
    ensure_latent_cache(folder, config.data, encode_chunk, identity, chunk, config.log.progress_bar)
