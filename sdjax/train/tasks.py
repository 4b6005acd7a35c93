"""The three things train.py can train, each as a Task the one loop runs.

    unet: latent diffusion on a frozen VAE and text encoder (fine-tuning, or from scratch on the
          outputs of the two stages below)                      export: a full diffusers folder
    vae:  AutoencoderKL on images                               export: vae/ (+ its latent scaling factor)
    clip: a CLIP dual encoder on image-caption pairs            export: text_encoder/, tokenizer/, clip/

A Task holds the networks its objective runs, the parameters read from files (the others start
random), which networks are trained, how to export and evaluate the result, and how captions are
tokenized for its batches (None: images only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Callable

import flax.linen as nn
from flax.traverse_util import flatten_dict
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdjax.convert.diffusers import save_components
from sdjax.convert.safetensors_io import write_safetensors
from sdjax.data.latent_cache import ensure_latent_cache
from sdjax.data.pipeline import all_captions, held_out
from sdjax.models import AutoencoderKL, VAEConfig
from sdjax.models.attention import resolved_impl
from sdjax.models.clip import CLIPConfig, CLIPModel, CLIPVisionConfig
from sdjax.models.presets import preset
from sdjax.train.build import build_model, scratch_tokenizer, text_config
from sdjax.train.checkpoint import fingerprint
from sdjax.train.objectives import Objective, clip_objective, diffusion_objective, vae_objective
from sdjax.train.step import trained_names

EVAL_CHUNK = 64  # held-out images per evaluation call


@dataclasses.dataclass
class Task:
    networks: dict[str, nn.Module]             # every network the objective runs, by name
    params: dict[str, Any]                     # host float32 params of networks read from files
    trained: tuple[str, ...]
    objective: Objective
    tokenize: Callable[[list[str]], np.ndarray] | None
    identity: dict[str, Any]                   # what a checkpoint must match to be resumed (JSON)
    export: Callable[[dict[str, Any], str], None]  # (all params, trained ones as EMA; folder) -> writes
    evaluate: Callable[[dict[str, Any]], dict[str, float]] | None = None
    preview: Callable[[dict[str, Any], dict], np.ndarray] | None = None  # (params, compiled cache) -> images


def build_task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    """The Task config.task names, built from config.model (reads earlier stages' exports)."""
    trained = trained_names(config)
    if config.task == "unet":
        return _unet_task(config, workdir, trained)
    if config.model.pretrained:
        raise ValueError(f"model.pretrained: task {config.task!r} trains from scratch; use model.vae_from "
                         "to start a vae run from a trained VAE")
    architecture = preset(config.model.architecture)
    return (_vae_task if config.task == "vae" else _clip_task)(config, workdir, trained, architecture)


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples become lists, as they do in a saved checkpoint


def _chunked(fn: Callable[[np.ndarray], Any], inputs: np.ndarray) -> Any:
    """fn over `inputs` in chunks of EVAL_CHUNK rows, its outputs (arrays or tuples of them) joined on host."""
    outputs = [jax.device_get(fn(inputs[i:i + EVAL_CHUNK])) for i in range(0, len(inputs), EVAL_CHUNK)]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


# --- tokenizer --------------------------------------------------------------------------------------


def fit_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Task "tokenizer": learns BPE merges from the captions of data.split and writes the tokenizer
    to workdir/export (vocab.json + merges.txt, read like any checkpoint's). Returns the folder."""
    from sdjax.tokenizer import train_tokenizer

    folder = os.path.join(workdir, "export")
    if not os.path.isdir(folder):
        texts = all_captions(config.data, config.tokenizer.num_captions)
        merges = None if config.tokenizer.num_merges < 0 else config.tokenizer.num_merges
        staging = folder + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer = train_tokenizer(texts, staging, merges, config.tokenizer.min_frequency)
        os.rename(staging, folder)  # complete or absent, like every export
        print(f"tokenizer: {len(tokenizer)} tokens learnt from {len(texts)} captions, written to {folder}")
    return folder


# --- unet -------------------------------------------------------------------------------------------


def _unet_task(config: ml_collections.ConfigDict, workdir: str, trained: tuple[str, ...]) -> Task:
    sd = build_model(config.model, workdir)
    params, sd.params = sd.params, {}  # the state owns the parameters from here on

    def export(all_params: dict, folder: str) -> None:
        dataclasses.replace(sd, params=all_params, programs={}, mesh=None).save(folder)

    def preview(all_params: dict, programs: dict) -> np.ndarray:
        view = dataclasses.replace(sd, params=all_params, programs=programs, mesh=None)
        side = config.data.resolution
        return view.generate(list(config.log.preview_prompts), num_steps=config.log.preview_steps,
                             guidance_scale=config.log.preview_guidance, height=side, width=side, seed=0)

    return Task(networks=sd.networks, params=params, trained=trained, objective=diffusion_objective(sd, config),
                tokenize=sd.tokenize, identity=fingerprint(sd, trained), export=export, preview=preview)


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


# --- vae --------------------------------------------------------------------------------------------


def psnr(reconstruction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of images in [-1, 1] (measured on the [0, 1] scale, peak 1)."""
    mse = np.mean(np.square((np.clip(reconstruction, -1, 1) - target) / 2), axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def _vae_task(config: ml_collections.ConfigDict, workdir: str, trained: tuple[str, ...],
              architecture: dict) -> Task:
    from sdjax.convert.diffusers import load_component

    model = config.model
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
        recon, latents = _chunked(lambda x: reconstruct(all_params["vae"], x), pixels)
        scores = psnr(recon, pixels)
        final.update(psnr=float(np.mean(scores)), psnr_min=float(np.min(scores)),
                     latent_std=float(np.std(latents)), eval_images=float(len(scores)))
        return dict(final)

    def export(all_params: dict, folder: str) -> None:
        # SD's rule: scale latents to unit variance for the diffusion model (0.18215 for SD's VAE).
        latent_std = final["latent_std"] if final else evaluate(all_params)["latent_std"]
        scaled = dataclasses.replace(vae_config, scaling_factor=1.0 / latent_std)
        save_components(folder, configs={"vae": scaled}, params={"vae": all_params["vae"]})

    identity = _json({"task": "vae", "configs": {"vae": vae_config.to_dict()}, "trained": list(trained)})
    return Task(networks={"vae": vae}, params=params, trained=trained, objective=vae_objective(vae, config),
                tokenize=None, identity=identity, export=export, evaluate=evaluate)


# --- clip -------------------------------------------------------------------------------------------


def clip_config(config: ml_collections.ConfigDict, tokenizer, architecture: dict) -> CLIPConfig:
    """The dual encoder: the preset's text tower (sized to the tokenizer) and config.model.clip's ViT."""
    raw = dict(config.model.clip)
    projection_dim = raw.pop("projection_dim")
    vision = CLIPVisionConfig.from_dict(dict(raw, image_size=config.data.resolution,
                                             intermediate_size=4 * raw["hidden_size"]), "config.model.clip")
    return CLIPConfig(text=text_config(architecture, tokenizer),
                      vision=vision, projection_dim=projection_dim)


def retrieval_accuracy(image_emb: np.ndarray, text_emb: np.ndarray, captions: list[str],
                       texts: list[str]) -> dict[str, float]:
    """Top-1 retrieval between images and the distinct `texts` (embeddings row-aligned with them).

    image_to_text: the fraction of images whose best-matching text is their own caption.
    text_to_image: the fraction of texts whose best-matching image has that caption.
    """
    similarity = image_emb @ text_emb.T
    truth = np.asarray([texts.index(c) for c in captions])
    best_text = np.argmax(similarity, axis=1)
    best_image = np.argmax(similarity, axis=0)
    return {"image_to_text": float(np.mean(best_text == truth)),
            "text_to_image": float(np.mean(truth[best_image] == np.arange(len(texts)))),
            "eval_images": float(len(captions)), "eval_texts": float(len(texts))}


def _clip_task(config: ml_collections.ConfigDict, workdir: str, trained: tuple[str, ...],
               architecture: dict) -> Task:
    from sdjax.tokenizer import tokenize

    model = config.model
    if model.text_encoder_from or model.vae_from:
        raise ValueError("task 'clip' trains both towers from scratch; model.text_encoder_from and "
                         "model.vae_from must be empty")
    tokenizer = scratch_tokenizer(model, workdir)
    cfg = clip_config(config, tokenizer, architecture)
    clip = CLIPModel(cfg, dtype=jnp.dtype(model.dtype), param_dtype=jnp.float32)
    length = cfg.text.max_position_embeddings
    tokenize_fn = lambda prompts: tokenize(tokenizer, prompts, length)

    def evaluate(all_params: dict) -> dict[str, float]:
        data = held_out(config.data, config.eval.split, config.eval.num_examples)
        variables = {"params": all_params["clip"]}
        texts = sorted(set(data["captions"]))
        image_emb = _chunked(jax.jit(lambda x: clip.apply(variables, x, method="encode_image")), data["pixels"])
        text_emb = _chunked(jax.jit(lambda ids: clip.apply(variables, ids, method="encode_text")),
                            tokenize_fn(texts))
        metrics = retrieval_accuracy(image_emb, text_emb, data["captions"], texts)
        metrics["temperature"] = float(1.0 / np.exp(np.asarray(all_params["clip"]["logit_scale"])))
        return metrics

    def export(all_params: dict, folder: str) -> None:
        weights = jax.tree.map(np.asarray, all_params["clip"])

        def dual_encoder(staging: str) -> None:  # the whole CLIP model, for retrieval and scoring
            os.makedirs(os.path.join(staging, "clip"))
            with open(os.path.join(staging, "clip", "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=2)
            # Our own parameter names (dotted paths): the dual encoder has no diffusers counterpart.
            flat = {k: np.ascontiguousarray(v) for k, v in flatten_dict(weights, sep=".").items()}
            write_safetensors(os.path.join(staging, "clip", "model.safetensors"), flat)

        save_components(folder, configs={"text_encoder": cfg.text}, params={"text_encoder": weights["text_model"]},
                        tokenizer=tokenizer, extra=dual_encoder)

    identity = _json({"task": "clip", "configs": {"clip": cfg.to_dict()}, "trained": list(trained)})
    return Task(networks={"clip": clip}, params={}, trained=trained, objective=clip_objective(clip),
                tokenize=tokenize_fn, identity=identity, export=export, evaluate=evaluate)
