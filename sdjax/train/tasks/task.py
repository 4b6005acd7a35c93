"""A Task: what the one training loop (sdjax.train.loop) needs to know about the thing it trains."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from sdjax.train.objectives import Objective

EVAL_CHUNK = 64  # held-out images per evaluation call


@dataclasses.dataclass(frozen=True)
class Task:
    """The networks a task's objective runs, the parameters read from files (the others start random),
    which networks are trained, how captions are tokenized for its batches (None: images only), and
    how the result is exported, evaluated and previewed. A task without gradient steps (the
    tokenizer's) has only `fit`."""

    networks: dict[str, nn.Module] = dataclasses.field(default_factory=dict)  # every network the objective runs
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # host float32 params read from files
    trained: tuple[str, ...] = ()
    objective: Objective | None = None
    tokenize: Callable[[list[str]], dict[str, np.ndarray]] | None = None  # captions -> {batch key: ids}
    identity: dict[str, Any] = dataclasses.field(default_factory=dict)  # what a resumed checkpoint must match
    export: Callable[[dict[str, Any], str], None] | None = None  # (all params, trained ones as EMA; folder)
    evaluate: Callable[[dict[str, Any]], dict[str, float]] | None = None
    preview: Callable[[dict[str, Any]], np.ndarray] | None = None  # params -> images
    # Run by every process before the data stream opens, with the frozen networks' params: returns a
    # latent cache folder for the stream to read instead of pixels ("" for none).
    prepare_data: Callable[[dict[str, Any]], str] | None = None
    fit: Callable[[], None] | None = None  # a task without gradient steps: its whole work, run by process 0


def refuse_latent_cache(config: ml_collections.ConfigDict) -> None:
    """The check of a task that needs the pixels."""
    if config.data.cache_latents:
        raise ValueError(f"data.cache_latents: only task 'unet' trains on a frozen VAE's latents; "
                         f"task {config.task!r} needs the pixels")


def as_json(value: Any) -> Any:
    """`value` as a saved checkpoint holds it: tuples become lists."""
    return json.loads(json.dumps(value))


def chunked(fn: Callable[[np.ndarray], Any], inputs: np.ndarray) -> Any:
    """fn over `inputs` in chunks of EVAL_CHUNK rows, its outputs (arrays or tuples of them) joined on host."""
    outputs = [jax.device_get(fn(inputs[i:i + EVAL_CHUNK])) for i in range(0, len(inputs), EVAL_CHUNK)]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def refuse_pretrained(config: ml_collections.ConfigDict) -> None:
    """The check of a task that trains from scratch."""
    if config.model.pretrained:
        raise ValueError(f"model.pretrained: task {config.task!r} trains from scratch; use model.vae_from "
                         "to start a vae run from a trained VAE")
