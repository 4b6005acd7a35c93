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
    programs: dict = dataclasses.field(default_factory=dict, repr=False)  # compiled samplers by Plan
    mesh: Any = None     # set by `shard`: sampling then runs with the image batch split over the mesh
    rules: Any = None

    @property
    def networks(self) -> dict[str, Any]:
        """The three Flax modules, by component name (the keys of `params`)."""
        return {"text_encoder": self.text_encoder, "vae": self.vae, "unet": self.unet}

    @property
    def configs(self) -> dict[str, Any]:
        """The typed model configs, by component name."""
        return {name: module.config for name, module in self.networks.items()}

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> int32 ids (N, max_position_embeddings), padded with the checkpoint's pad token."""
        return tokenize(self.tokenizer, prompts, self.text_encoder.config.max_position_embeddings)

    def generate(self, prompts: list[str], negative_prompts: list[str] | None = None, *, num_steps: int = 50,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0, scheduler: str | None = None,
                 scheduler_options: dict[str, Any] | None = None, height: int | None = None,
                 width: int | None = None, seed: int | list[int] = 0, latents: np.ndarray | None = None,
                 init_image: np.ndarray | None = None, strength: float | None = None,
                 mask: np.ndarray | None = None) -> np.ndarray:
        """Images (N, H, W, 3) float32 in [0, 1], one per prompt. Raises ValueError for bad arguments
        (before any compute) and sdjax.pipeline.SamplingError if an image comes out non-finite.

        Args:
          prompts / negative_prompts: one negative per prompt (default: the empty prompt).
          num_steps: scheduler steps; guidance_scale <= 1 skips the unconditional pass.
          guidance_rescale: Lin et al. 2023 rescaling (0 = off).
          scheduler: a name from sdjax.schedulers.SCHEDULERS; default: the checkpoint's own.
          scheduler_options: family options, e.g. {"eta": 0.5} for DDIM.
          height / width: multiples of 8; default: the UNet's sample_size x the VAE factor.
          seed: image i uses seed + i (or give one seed per image), integers in [0, 2**64); an
            image's result does not depend on the other images in the batch.
          latents: initial noise (N, H/8, W/8, 4), NHWC, instead of the seeded draw.
          init_image: img2img / inpainting source (N, H, W, 3) in [0, 1].
          strength: in (0, 1], how much of the schedule is run from the noised init_image
            (default 0.8 for img2img; 1.0 for inpainting, which then starts from pure noise).
          mask: inpainting mask (N, H, W) or (N, H, W, 1), binarised at 0.5: 1 = repaint, 0 = keep.
            A regular UNet blends the kept region back after every step; a 9-channel inpainting
            UNet gets the mask and the masked image's latents as extra input channels.
        """
        from sdjax.pipeline import generate

        return generate(self, prompts, negative_prompts, num_steps=num_steps, guidance_scale=guidance_scale,
                        guidance_rescale=guidance_rescale, scheduler=scheduler,
                        scheduler_options=scheduler_options, height=height, width=width, seed=seed,
                        latents=latents, init_image=init_image, strength=strength, mask=mask)

    def shard(self, mesh: Any, rules: Any = None) -> "StableDiffusion":
        """Places the parameters on `mesh` by logical-axis rules (default sdjax.parallel.DEFAULT_RULES);
        `generate` then splits each image batch over the batch axes (its size must divide evenly)."""
        from sdjax.models.params import place_params
        from sdjax.parallel import DEFAULT_RULES, check_rules

        rules = tuple(DEFAULT_RULES if rules is None else rules)
        check_rules(rules)
        self.params = {n: place_params(p, self.networks[n], mesh, rules) for n, p in self.params.items()}
        self.mesh, self.rules = mesh, rules
        self.programs.clear()
        return self

    def save(self, folder: str, dtype: Any = None) -> None:
        """Exports to a new diffusers folder (safetensors), readable by diffusers and `sdjax.load`."""
        params = jax.tree.map(np.asarray, self.params)
        save_pipeline(folder, configs=self.configs, params=params, tokenizer=self.tokenizer,
                      scheduler_config=self.scheduler_config, model_index=self.model_index, dtype=dtype)


def load(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = None, attention_impl: str = "auto",
         variant: str | None = None, allow_pickle: bool = False, to_device: bool = True) -> StableDiffusion:
    """Loads a Stable Diffusion 1.x/2.x checkpoint from a diffusers folder.

    Args:
      path: folder with model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/.
      dtype: compute dtype of the networks (e.g. jnp.bfloat16 on TPU/GPU).
      param_dtype: storage dtype of the parameters; defaults to `dtype`.
      attention_impl: "auto" (the Pallas kernel on TPU, "xla" elsewhere), "xla", "dot", "cudnn" or
        "splash" (see sdjax.models.attention).
      variant: weight-file variant, e.g. "fp16" for diffusion_pytorch_model.fp16.safetensors.
      allow_pickle: also read .bin/.ckpt weights (unpickling can run code: only for trusted files).
      to_device: False keeps the parameters as host numpy arrays, to be placed (e.g. sharded) by the caller.
    """
    path = os.fspath(path)
    model_index = read_model_index(path)
    param_dtype = param_dtype or dtype
    configs, params = {}, {}
    place = jnp.asarray if to_device else None
    for name in COMPONENTS:
        configs[name], params[name] = load_component(path, name, dtype=np.dtype(param_dtype), variant=variant,
                                                     allow_pickle=allow_pickle, place=place)
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
