"""Task "unet": latent diffusion on a frozen VAE and text encoder (fine-tuning a checkpoint, or from
scratch on the outputs of the earlier stages). Export: a whole diffusers folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
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
from sdjax.lora import TEXT_TARGETS, TRAINED, UNET_TARGETS, save_kohya, train_targets, with_trained
from sdjax.models.attention import resolved_impl
from sdjax.models.lora_factors import LoRAFactors
from sdjax.models.token_rows import TokenRows
from sdjax.parallel import sync_processes, to_host
from sdjax.pipeline import generate
from sdjax.stable_diffusion import Model, save
from sdjax.storage import staged_folder
from sdjax.textual_inversion import TRAINED as TI_TRAINED
from sdjax.textual_inversion import placeholder, row_ids, save_embedding, with_rows
from sdjax.train.build import build_model
from sdjax.train.checkpoint import fingerprint
from sdjax.train.objectives import Objective, diffusion_objective
from sdjax.train.tasks.task import EVAL_CHUNK, Task


def check(config: ml_collections.ConfigDict) -> None:
    if config.data.cache_latents:
        check_cacheable(config.data)
    lora = config.lora
    if lora.rank < 0 or lora.alpha < 0:
        raise ValueError(f"lora.rank and lora.alpha must be >= 0, got {lora.rank} and {lora.alpha}")
    if lora.rank and config.model.train_text_encoder:
        raise ValueError("lora.rank with model.train_text_encoder: a LoRA run trains LoRAs only; set "
                         "lora.text_encoder for text-encoder LoRAs")
    if lora.rank and not config.model.pretrained:
        raise ValueError("lora.rank: a LoRA is trained on a pretrained model; set model.pretrained")
    for key in ("unet_targets", "text_targets"):
        try:
            re.compile(lora[key])
        except re.error as e:
            raise ValueError(f"lora.{key}: not a regular expression ({e})") from None
    ti = config.textual_inversion
    if ti.token:
        if lora.rank or config.model.train_text_encoder:
            raise ValueError("textual_inversion.token: a textual-inversion run trains the new word alone; unset "
                             "lora.rank and model.train_text_encoder")
        if not config.model.pretrained:
            raise ValueError("textual_inversion.token: a new word is taught to a pretrained model; set "
                             "model.pretrained")
        if not ti.initializer:
            raise ValueError("textual_inversion.initializer: required with textual_inversion.token (a word whose "
                             "embedding the new one starts from)")
        if ti.vectors < 1:
            raise ValueError(f"textual_inversion.vectors must be >= 1, got {ti.vectors}")
        if ti.template:
            try:
                filled = ti.template.format(ti.token)
            except (IndexError, KeyError, ValueError):
                filled = ""
            if ti.template.count("{}") != 1 or ti.token not in filled:
                raise ValueError(f"textual_inversion.template {ti.template!r}: needs one {{}} where the token goes "
                                 "(and no other braces)")
            if config.data.caption_dropout:
                raise ValueError("textual_inversion.template with data.caption_dropout: the template is every "
                                 "caption, so set data.caption_dropout=0")
        if ti.template and ti.replace:
            raise ValueError("textual_inversion.template and textual_inversion.replace: give one (the template "
                             "replaces whole captions)")
    elif ti.initializer or ti.template or ti.replace:
        raise ValueError("textual_inversion.*: set textual_inversion.token to train a new word")


def trained(config: ml_collections.ConfigDict, model: Model) -> tuple[str, ...]:
    """The UNet, and with model.train_text_encoder every text encoder of `model` (SDXL: both)."""
    encoders = tuple(enc.encoder for enc in model.text) if config.model.train_text_encoder else ()
    return ("unet",) + encoders


def check_model(model: Model) -> None:
    """Refuses models this task cannot train, in one line."""
    if takes_added_conditions(model) and uses_aesthetic_score(model):
        raise ValueError("model.pretrained: an SDXL refiner (requires_aesthetics_score) conditions on a per-image "
                         "aesthetic score the training data does not carry; fine-tune the SDXL base instead")


def lora_network(config: ml_collections.ConfigDict, model: Model) -> LoRAFactors:
    """The LoRAFactors a config.lora run trains on `model`: the UNet's targets, and the text encoders'
    with lora.text_encoder."""
    patterns = {"unet": config.lora.unet_targets or UNET_TARGETS}
    if config.lora.text_encoder:
        patterns.update({enc.encoder: config.lora.text_targets or TEXT_TARGETS for enc in model.text})
    return LoRAFactors(train_targets(model, patterns), config.lora.rank)


def lora_multiplier(config: ml_collections.ConfigDict) -> float:
    """alpha / rank (alpha 0: the rank, a multiplier of 1)."""
    return (config.lora.alpha or config.lora.rank) / config.lora.rank


def training(config: ml_collections.ConfigDict,
             model: Model) -> tuple[dict[str, nn.Module], tuple[str, ...], Objective]:
    """(the networks the step runs, those trained, the objective) of a run on `model`: full fine-tuning,
    or with config.lora.rank a LoRA (every network frozen, the factors applied at alpha / rank).
    train.py and plan.py both build the step from this."""
    objective = diffusion_objective(model, config)
    token = config.textual_inversion.token
    if token:
        if token not in model.embeddings:
            raise ValueError(f"textual_inversion.token {token!r}: the model has no such word yet (sdjax.train "
                             "adds it with textual_inversion.placeholder; plan.py does not plan these runs)")
        ids = row_ids(model, token)
        rows = TokenRows(tuple((enc, len(i), model.networks[enc].config.hidden_size) for enc, i in ids.items()))
        loss = lambda nets, batch, rand: objective.loss(with_rows(nets, ids), batch, rand)
        return {**model.networks, TI_TRAINED: rows}, (TI_TRAINED,), objective._replace(loss=loss)
    if not config.lora.rank:
        return dict(model.networks), trained(config, model), objective
    multiplier = lora_multiplier(config)
    loss = lambda nets, batch, rand: objective.loss(with_trained(nets, multiplier), batch, rand)
    return {**model.networks, TRAINED: lora_network(config, model)}, (TRAINED,), objective._replace(loss=loss)


def build(config: ml_collections.ConfigDict, workdir: str) -> Task:
    start = build_model(config.model, workdir)
    model = start.model
    check_model(model)
    if config.lora.rank:
        return _lora_task(config, model, start.params, workdir)
    if config.textual_inversion.token:
        return _textual_inversion_task(config, model, start.params, workdir)

    def export(all_params: dict, folder: str) -> None:
        save(model, all_params, folder)

    networks, names, objective = training(config, model)
    return Task(networks=networks, params=dict(start.params), trained=names, objective=objective,
                tokenize=tokenizer_fn(model),
                identity=fingerprint(model, names), export=export, preview=_preview(config, model),
                prepare_data=_prepare_data(config, model, workdir))


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


def _preview(config: ml_collections.ConfigDict, model: Model, weights=lambda params: params):
    """params -> the preview images (fixed seed) of the model with weights(params)."""
    def preview(all_params: dict) -> np.ndarray:
        side = config.data.resolution
        return generate(model, weights(all_params), list(config.log.preview_prompts),
                        num_steps=config.log.preview_steps, guidance_scale=config.log.preview_guidance,
                        height=side, width=side, seed=0)

    return preview


def _prepare_data(config: ml_collections.ConfigDict, model: Model, workdir: str):
    """data.cache_latents: the frozen VAE runs once over the split instead of in every step."""
    if not config.data.cache_latents:
        return None

    def prepare_data(frozen: dict) -> str:
        folder = os.path.join(workdir, "latent_cache")  # a URL too (posix join)
        vae_params = to_host(frozen["vae"])  # a gather every process takes part in
        if jax.process_index() == 0:  # builds (a gs:// workdir: and uploads) it; the others then read it
            cache_latents(config, folder, model.vae, vae_params)
        sync_processes("latent cache ready")
        return folder

    return prepare_data


def _lora_task(config: ml_collections.ConfigDict, model: Model, params: dict[str, Any], workdir: str) -> Task:
    """Training a LoRA: every network of the model frozen, only the factors trained (and held by the
    optimizer and the EMA); the objective, previews and the export see the model with them applied.
    Export: a kohya-format lora.safetensors (read by sdjax, diffusers, A1111 and ComfyUI)."""
    networks, names, objective = training(config, model)
    multiplier = lora_multiplier(config)

    def export(all_params: dict, folder: str) -> None:
        with staged_folder(folder) as staging:
            save_kohya(os.path.join(staging, "lora.safetensors"), model, all_params[TRAINED],
                       config.lora.alpha or config.lora.rank, config.lora.rank)

    identity = {**fingerprint(model, names), "lora": config.lora.to_dict()}
    return Task(networks=networks, params=dict(params), trained=names,
                objective=objective, tokenize=tokenizer_fn(model), identity=json.loads(json.dumps(identity)),
                export=export, preview=_preview(config, model, lambda p: with_trained(p, multiplier)),
                prepare_data=_prepare_data(config, model, workdir))


class CaptionRewrite:
    """Captions -> token ids with a textual-inversion run's captions: each one `template` with the token, or
    `replace` swapped for the token. A class so grain workers can pickle it."""

    def __init__(self, tokenize, token: str, template: str, replace: str):
        self.tokenize, self.token, self.template, self.replace = tokenize, token, template, replace

    def rewrite(self, caption: str) -> str:
        if self.template:  # every caption, empty ones too (check() refuses caption dropout with a template)
            return self.template.format(self.token)
        if self.replace:
            return re.sub(rf"\b{re.escape(self.replace)}\b", self.token, caption)
        return caption

    def __call__(self, captions: list[str]) -> dict[str, np.ndarray]:
        return self.tokenize([self.rewrite(c) for c in captions])


def _textual_inversion_task(config: ml_collections.ConfigDict, model: Model, params: dict[str, Any],
                            workdir: str) -> Task:
    """Textual inversion: the new word added to the tokenizers and tables (its rows started from the
    initializer word), every network frozen, only the rows trained (and held by the optimizer); previews
    and the export see the rows in place. Export: learned_embeds.safetensors and an A1111 embedding."""
    ti = config.textual_inversion
    model, params, rows = placeholder(model, params, ti.token, ti.initializer, ti.vectors)
    networks, names, objective = training(config, model)
    ids = row_ids(model, ti.token)

    def export(all_params: dict, folder: str) -> None:
        with staged_folder(folder) as staging:
            save_embedding(staging, model, all_params[TI_TRAINED], ti.token)

    identity = {**fingerprint(model, names), "textual_inversion": config.textual_inversion.to_dict()}
    return Task(networks=networks, params={**params, TI_TRAINED: rows}, trained=names, objective=objective,
                tokenize=CaptionRewrite(tokenizer_fn(model), ti.token, ti.template, ti.replace),
                identity=json.loads(json.dumps(identity)), export=export,
                preview=_preview(config, model, lambda p: with_rows(p, ids)),
                prepare_data=_prepare_data(config, model, workdir))
