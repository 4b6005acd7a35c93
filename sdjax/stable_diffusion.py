"""`sdjax.load`: one object holding a Stable Diffusion checkpoint's tokenizer, networks and parameters."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.diffusers import (COMPONENTS, load_component, read_json, read_model_index, save_pipeline)
from sdjax.models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig, VAEConfig
from sdjax.tokenizer import load_tokenizer, tokenize


@dataclasses.dataclass
class StableDiffusion:
    """A loaded checkpoint. `params` maps "text_encoder" / "vae" / "unet" to plain parameter pytrees."""

    tokenizer: Any
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    params: dict[str, Any]
    scheduler_config: dict[str, Any]
    model_index: dict[str, Any]

    @property
    def configs(self) -> dict[str, Any]:
        """The typed model configs, by component name."""
        return {"text_encoder": self.text_encoder.config, "vae": self.vae.config, "unet": self.unet.config}

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> int32 ids (N, max_position_embeddings), padded with the checkpoint's pad token."""
        return tokenize(self.tokenizer, prompts, self.text_encoder.config.max_position_embeddings)

    def save(self, folder: str, dtype: Any = None) -> None:
        """Exports to a new diffusers folder (safetensors), readable by diffusers and `sdjax.load`."""
        params = jax.tree.map(np.asarray, self.params)
        save_pipeline(folder, configs=self.configs, params=params, tokenizer=self.tokenizer,
                      scheduler_config=self.scheduler_config, model_index=self.model_index, dtype=dtype)


def load(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = None, attention_impl: str = "xla",
         variant: str | None = None, allow_pickle: bool = False) -> StableDiffusion:
    """Loads a Stable Diffusion 1.x/2.x checkpoint from a diffusers folder.

    Args:
      path: folder with model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/.
      dtype: compute dtype of the networks (e.g. jnp.bfloat16 on TPU/GPU).
      param_dtype: storage dtype of the parameters; defaults to `dtype`.
      attention_impl: "xla", "dot" or "cudnn" (see sdjax.models.attention).
      variant: weight-file variant, e.g. "fp16" for diffusion_pytorch_model.fp16.safetensors.
      allow_pickle: also read .bin/.ckpt weights (unpickling can run code: only for trusted files).
    """
    path = os.fspath(path)
    model_index = read_model_index(path)
    param_dtype = param_dtype or dtype
    configs, params = {}, {}
    for name in COMPONENTS:
        configs[name], tree = load_component(path, name, dtype=np.dtype(param_dtype), variant=variant,
                                             allow_pickle=allow_pickle)
        params[name] = jax.tree.map(jnp.asarray, tree)
    modules = dict(attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype)
    scheduler_config = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    return StableDiffusion(
        tokenizer=load_tokenizer(os.path.join(path, "tokenizer")),
        text_encoder=CLIPTextModel(configs["text_encoder"], **modules),
        vae=AutoencoderKL(configs["vae"], **modules),
        unet=UNet2DConditionModel(configs["unet"], **modules),
        params=params, scheduler_config=scheduler_config, model_index=model_index,
    )


__all__ = ["StableDiffusion", "load", "CLIPTextConfig", "UNetConfig", "VAEConfig"]
