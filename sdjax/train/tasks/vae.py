"""Task "vae": an AutoencoderKL trained on images. Export: vae/ with the scaling factor that makes its
latents unit-variance."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdjax.convert.diffusers import load_component, save_components
from sdjax.data.source import held_out
from sdjax.models import AutoencoderKL, VAEConfig
from sdjax.models.presets import preset
from sdjax.train.objectives import vae_objective
from sdjax.train.tasks.task import Task, as_json, chunked, refuse_latent_cache, refuse_pretrained

check = refuse_latent_cache


def psnr(reconstruction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of images in [-1, 1] (measured on the [0, 1] scale, peak 1)."""
    mse = np.mean(np.square((np.clip(reconstruction, -1, 1) - target) / 2), axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def build(config: ml_collections.ConfigDict, workdir: str) -> Task:
    model = config.model
    refuse_pretrained(config)
    architecture = preset(model.architecture)
    if model.vae_from:
        vae_config, params = load_component(model.vae_from, "vae")
        params = {"vae": params}
    else:
        vae_config, params = VAEConfig.from_dict(architecture["vae"], "preset"), {}
    kw = dict(dtype=jnp.dtype(model.dtype), param_dtype=jnp.float32)
    vae = AutoencoderKL(vae_config, **kw)
    final = {}  # the held-out scores of the final weights: the loop evaluates, then exports them

    @jax.jit
    def reconstruct(p, pixels):
        mean, _ = vae.apply({"params": p}, pixels, method="encode")
        return vae.apply({"params": p}, mean, method="decode").astype(jnp.float32), mean.astype(jnp.float32)

    def evaluate(all_params: dict) -> dict[str, float]:
        pixels = held_out(config.data, config.eval.split, config.eval.num_examples)["pixels"]
        recon, latents = chunked(lambda x: reconstruct(all_params["vae"], x), pixels)
        scores = psnr(recon, pixels)
        final.update(psnr=float(np.mean(scores)), psnr_min=float(np.min(scores)),
                     latent_std=float(np.std(latents)), eval_images=float(len(scores)))
        return dict(final)

    def export(all_params: dict, folder: str) -> None:
        # SD's rule: scale latents to unit variance for the diffusion model (0.18215 for SD's VAE).
        latent_std = final["latent_std"] if final else evaluate(all_params)["latent_std"]
        scaled = dataclasses.replace(vae_config, scaling_factor=1.0 / latent_std)
        save_components(folder, configs={"vae": scaled}, params={"vae": all_params["vae"]})

    identity = as_json({"task": "vae", "configs": {"vae": vae_config.to_dict()}, "trained": ["vae"]})
    return Task(networks={"vae": vae}, params=params, trained=("vae",), objective=vae_objective(vae, config),
                tokenize=None, identity=identity, export=export, evaluate=evaluate)
