"""Task "clip": a CLIP dual encoder trained from scratch on image-caption pairs. Export: text_encoder/,
tokenizer/ and the whole dual encoder in clip/."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict

from sdjax.conditioning import TokenizerFn
from sdjax.convert.diffusers import save_components
from sdjax.convert.safetensors_io import write_safetensors
from sdjax.data.source import held_out
from sdjax.models.clip import CLIPConfig, CLIPModel, CLIPVisionConfig
from sdjax.models.presets import preset
from sdjax.train.build import scratch_tokenizer, text_config
from sdjax.train.objectives import clip_objective
from sdjax.train.tasks.task import Task, as_json, chunked, refuse_latent_cache, refuse_pretrained

check = refuse_latent_cache


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


def build(config: ml_collections.ConfigDict, workdir: str) -> Task:
    model = config.model
    refuse_pretrained(config)
    architecture = preset(model.architecture)
    if model.text_encoder_from or model.vae_from:
        raise ValueError("task 'clip' trains both towers from scratch; model.text_encoder_from and "
                         "model.vae_from must be empty")
    tokenizer = scratch_tokenizer(model, workdir)
    cfg = clip_config(config, tokenizer, architecture)
    clip = CLIPModel(cfg, dtype=jnp.dtype(model.dtype), param_dtype=jnp.float32)
    tokenize_fn = TokenizerFn({"input_ids": (tokenizer, cfg.text.max_position_embeddings)})

    def evaluate(all_params: dict) -> dict[str, float]:
        data = held_out(config.data, config.eval.split, config.eval.num_examples)
        variables = {"params": all_params["clip"]}
        texts = sorted(set(data["captions"]))
        image_emb = chunked(jax.jit(lambda x: clip.apply(variables, x, method="encode_image")), data["pixels"])
        text_emb = chunked(jax.jit(lambda ids: clip.apply(variables, ids, method="encode_text")),
                            tokenize_fn(texts)["input_ids"])
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

    identity = as_json({"task": "clip", "configs": {"clip": cfg.to_dict()}, "trained": ["clip"]})
    return Task(networks={"clip": clip}, params={}, trained=("clip",), objective=clip_objective(clip),
                tokenize=tokenize_fn, identity=identity, export=export, evaluate=evaluate)
