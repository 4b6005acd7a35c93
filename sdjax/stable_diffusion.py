"""A Stable Diffusion checkpoint as data: `Model` describes it (networks, tokenizers, scheduler config),
its parameters are a separate pytree, and `StableDiffusion` pairs the two for convenience.

    model, params = sd.model, sd.params            # what sdjax.load returns, taken apart
    images = sdjax.generate(model, params, prompts)   # the functional form of sd.generate(prompts)

All three are immutable: sharding, remat or a different dtype give a new object. Compiled sampling
programs are cached by sdjax.pipeline, keyed by the Model and what they are specialised to.
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax import storage
from sdjax.conditioning import TextEncoding, text_encodings, tokenizer_fn
from sdjax.convert.diffusers import (COMPONENTS, load_component, model_components, read_component_config, read_json,
                                     read_model_index, save_pipeline)
from sdjax.convert.families import Description, check_prediction_type, describe_file
from sdjax.convert.safetensors_io import CheckpointError
from sdjax.convert.single_file import read_tensors, save_single_file, single_file_params
from sdjax.models import CLIPTextConfig, UNetConfig, VAEConfig
from sdjax.tokenizer import load_tokenizer

_MAPPINGS = ("networks", "tokenizers", "scheduler_config", "model_index", "embeddings")


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """What a checkpoint is, without its weights. `networks` and `tokenizers` are keyed by the folder's
    component names (text_encoder, unet, vae; tokenizer). Equality is identity: a Model keys caches."""

    networks: Mapping[str, nn.Module]
    tokenizers: Mapping[str, Any]
    scheduler_config: Mapping[str, Any]
    model_index: Mapping[str, Any]
    # Textual-inversion words loaded (sdjax.textual_inversion): word -> the tokens it stands for.
    embeddings: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in _MAPPINGS:  # read-only views of private copies
            object.__setattr__(self, name, types.MappingProxyType(dict(getattr(self, name))))

    @property
    def unet(self) -> nn.Module:
        return self.networks["unet"]

    @property
    def vae(self) -> nn.Module:
        return self.networks["vae"]

    @property
    def text(self) -> tuple[TextEncoding, ...]:
        """The (tokenizer, text encoder) pairs the conditioning is made from (sdjax.conditioning)."""
        return text_encodings(tuple(self.networks))

    @property
    def configs(self) -> dict[str, Any]:
        """The typed model configs, by component name."""
        return {name: module.config for name, module in self.networks.items()}

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Prompts -> {batch key: int32 ids (N, L)}, one entry per tokenizer (see sdjax.conditioning)."""
        return tokenizer_fn(self)(prompts)

    def replace(self, **changes: Any) -> "Model":
        """A new Model with some fields changed, e.g. `scheduler_config=...`."""
        return dataclasses.replace(self, **changes)

    def with_networks(self, **modules: nn.Module) -> "Model":
        """A new Model with some networks replaced, e.g. `unet=model.unet.clone(remat=True)`."""
        unknown = sorted(set(modules) - set(self.networks))
        if unknown:
            raise ValueError(f"with_networks: no network named {', '.join(unknown)} (has {', '.join(self.networks)})")
        return self.replace(networks={**self.networks, **modules})

    def map_networks(self, **options: Any) -> "Model":
        """A new Model with every network cloned with `options`, e.g. `param_dtype=jnp.bfloat16`."""
        return self.replace(networks={name: module.clone(**options) for name, module in self.networks.items()})


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
    """A Model with its parameters (`params[name]` is the pytree of `model.networks[name]`) and, once
    `shard` placed them, the mesh and logical-axis rules that sampling then runs under."""

    model: Model
    params: Mapping[str, Any]
    mesh: Any = None
    rules: Any = None
    loras: tuple = ()                     # ((sdjax.lora.LoRA, scale), ...) that `params` carry
    loras_merged: bool = True             # merged into the weights, or applied at run time (params["loras"])
    base_params: Mapping[str, Any] | None = None  # the weights without the LoRAs, kept to remove them bitwise

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """See Model.tokenize."""
        return self.model.tokenize(prompts)

    def generate(self, prompts: list[str], negative_prompts: list[str] | None = None, **options: Any) -> np.ndarray:
        """Images (N, H, W, 3) float32 in [0, 1], one per prompt; options as sdjax.pipeline.generate."""
        from sdjax.pipeline import generate

        return generate(self.model, self.params, prompts, negative_prompts, mesh=self.mesh, rules=self.rules,
                        **options)

    def with_textual_inversion(self, embedding: Any, token: str | None = None, *, override: bool = False,
                               allow_pickle: bool = False) -> "StableDiffusion":
        """A new StableDiffusion whose prompts can use `token` (default: the name the file gives), standing
        for the vectors of `embedding` (a file in diffusers', A1111's or SDXL's format, or a
        sdjax.textual_inversion.Embedding). A token already in the vocabulary is refused unless `override`."""
        from sdjax.textual_inversion import Embedding, add_embedding, read_embedding

        if not isinstance(embedding, Embedding):
            embedding = read_embedding(embedding, allow_pickle=allow_pickle)
        model, params = add_embedding(self.model, self._base(), embedding, token, override)
        grown = StableDiffusion(model, params)
        if self.mesh is not None:
            grown = grown.shard(self.mesh, self.rules)
        return grown._with_loras(self.loras, self.loras_merged)

    def with_lora(self, lora: Any, scale: float = 1.0, *, merge: bool = True,
                  allow_pickle: bool = False) -> "StableDiffusion":
        """A new StableDiffusion with one more LoRA (a file path, kohya or PEFT format, or a sdjax.lora.LoRA)
        at `scale`: merged into the weights (merge=True, fastest sampling) or applied inside the compiled
        program (merge=False: `with_lora_scales` then changes scales without recompiling). All LoRAs of
        one StableDiffusion take the same form."""
        from sdjax.lora import LoRA, read_lora

        if self.loras and merge != self.loras_merged:
            raise ValueError(f"with_lora: merge={merge}, but the LoRAs already on this model are "
                             f"{'merged' if self.loras_merged else 'applied at run time'}; one form for all")
        if not isinstance(lora, LoRA):
            lora = read_lora(lora, self.model, self._base(), allow_pickle=allow_pickle)
        return self._with_loras(self.loras + ((lora, _scale(scale, lora.name)),), merge)

    def with_lora_scales(self, *scales: float) -> "StableDiffusion":
        """The same LoRAs at new scales, one per LoRA in the order they were added."""
        from sdjax.lora import runtime_scales

        if len(scales) != len(self.loras):
            raise ValueError(f"with_lora_scales: {len(self.loras)} LoRA(s) on the model, {len(scales)} scale(s) given")
        loras = tuple((lora, _scale(s, lora.name)) for (lora, _), s in zip(self.loras, scales))
        if self.loras_merged:
            return self._with_loras(loras, True)
        return dataclasses.replace(self, params=runtime_scales(self.params, [s for _, s in loras]), loras=loras)

    def without_loras(self) -> "StableDiffusion":
        """The model without its LoRAs: the very weights it had before them (bitwise)."""
        return self._with_loras((), True)

    def _base(self) -> Mapping[str, Any]:
        return self.params if self.base_params is None else self.base_params

    def _with_loras(self, loras: tuple, merge: bool) -> "StableDiffusion":
        from sdjax.lora import merge as merged, with_runtime

        base = self._base()
        if not loras:
            return dataclasses.replace(self, params=base, loras=(), loras_merged=True, base_params=None)
        params = merged(base, loras) if merge else with_runtime(base, loras)
        return dataclasses.replace(self, params=params, loras=loras, loras_merged=merge, base_params=base)

    def shard(self, mesh: Any, rules: Any = None) -> "StableDiffusion":
        """A new StableDiffusion with the parameters placed on `mesh` by logical-axis rules (default
        sdjax.parallel.DEFAULT_RULES); its `generate` splits each image batch over the batch axes
        (their size must divide it)."""
        from sdjax.models.params import place_params
        from sdjax.parallel import DEFAULT_RULES, check_rules

        rules = tuple(DEFAULT_RULES if rules is None else rules)
        check_rules(rules)
        networks = self.model.networks
        params = {n: place_params(p, networks[n], mesh, rules) for n, p in self._base().items()}
        placed = dataclasses.replace(self, params=params, mesh=mesh, rules=rules, loras=(), base_params=None)
        return placed._with_loras(self.loras, self.loras_merged)  # LoRAs applied again to the placed weights

    def save(self, path: str, dtype: Any = None, layout: str = "diffusers") -> None:
        """Exports to a new diffusers folder (safetensors), readable by diffusers and `sdjax.load`, or with
        layout="single_file" to one .safetensors file in the original layout."""
        save(self.model, self.params, path, dtype, layout)


def _scale(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
        raise ValueError(f"LoRA {name}: scale must be a finite number, got {value!r}")
    return float(value)


LAYOUTS = ("diffusers", "single_file")


def save(model: Model, params: Mapping[str, Any], path: str, dtype: Any = None, layout: str = "diffusers") -> None:
    """Writes `model` with `params` as a new diffusers folder, or with layout="single_file" as one new
    .safetensors file in the original LDM layout (what A1111 and ComfyUI load; see
    sdjax.convert.single_file); `dtype` (e.g. np.float16) casts float weights."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    from sdjax.lora import resolve

    host = jax.tree.map(np.asarray, dict(resolve(params)))  # run-time LoRAs baked in, as merged ones are
    if layout == "single_file":
        save_single_file(path, model.configs, host, dtype)
        return
    save_pipeline(path, configs=model.configs, params=host, tokenizers=dict(model.tokenizers),
                  scheduler_config=dict(model.scheduler_config), model_index=dict(model.model_index), dtype=dtype)


def load(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = None, attention_impl: str = "auto",
         variant: str | None = None, allow_pickle: bool = False, to_device: bool = True, config: str | None = None,
         ema: bool = False, prediction_type: str | None = None) -> StableDiffusion:
    """Loads a Stable Diffusion checkpoint from a diffusers folder (the components its model_index.json
    names) or from a single file in the original LDM layout (SD 1.x, 2.x, inpainting, SDXL base and refiner).

    Args:
      path: folder with model_index.json and a sub-folder per component (text_encoder/, tokenizer/, unet/,
        vae/, scheduler/ for SD 1.x/2.x), or a single .safetensors file (.ckpt with allow_pickle); local,
        or a URL (gs://bucket/model, any fsspec store; each weight file is read into memory whole).
      dtype: compute dtype of the networks (e.g. jnp.bfloat16 on TPU/GPU).
      param_dtype: storage dtype of the parameters; defaults to `dtype`.
      attention_impl: "auto" (the Pallas kernel on TPU, "xla" elsewhere), "xla", "dot", "cudnn" or
        "splash" (see sdjax.models.attention).
      variant: weight-file variant, e.g. "fp16" for diffusion_pytorch_model.fp16.safetensors.
      allow_pickle: also read .bin/.ckpt weights (unpickling can run code: only for trusted files).
      to_device: False keeps the parameters as host numpy arrays, to be placed (e.g. sharded) by the caller.
      config: for a single file, a diffusers folder whose configs, tokenizers and scheduler describe its
        model (its weights are not read), as diffusers' from_single_file(config=...) takes it; by default
        those sdjax ships for the family the file's keys show (sdjax.convert.families).
      ema: for a single file that holds both, the UNet's EMA weights instead of the others.
      prediction_type: "epsilon" or "v_prediction", overriding the scheduler's; for a single file without
        config= the default follows sdjax.convert.families (SD 2.x: v_prediction).
    """
    path = os.fspath(path)
    if storage.is_remote(path):
        storage.check_readable(path, "model")  # no such bucket or object: one line naming it
    config = None if config is None else os.fspath(config)
    if config is not None and storage.is_remote(config):
        storage.check_readable(config, "config")
    single = storage.isfile(path)
    if not single and (config is not None or ema):
        raise ValueError(f"{path}: config= and ema= are for single-file checkpoints, not diffusers folders")
    param_dtype = param_dtype or dtype
    place = jnp.asarray if to_device else None
    if single:
        tensors = read_tensors(path, allow_pickle)
        if config is None:
            description = describe_file(path, tensors, prediction_type)
        else:
            description = _folder_description(config)
        try:
            params = single_file_params(path, tensors, description.configs, ema=ema, dtype=np.dtype(param_dtype),
                                        place=place)
        except CheckpointError as e:
            if config is not None:
                raise
            raise CheckpointError(f"{e} (read as the {description.family} model sdjax ships; for another "
                                  "architecture give its diffusers folder as config=, in sample.py "
                                  "--model-config)") from None
    else:
        description = _folder_description(path)
        params = {name: load_component(path, name, dtype=np.dtype(param_dtype), variant=variant,
                                       allow_pickle=allow_pickle, place=place)[1] for name in description.configs}
    scheduler_config = dict(description.scheduler_config)
    if prediction_type is not None:
        scheduler_config["prediction_type"] = check_prediction_type(prediction_type)
    options = dict(attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype)
    networks = {name: COMPONENTS[name].module_cls(cfg, **options) for name, cfg in description.configs.items()}
    from sdjax.textual_inversion import words_in

    first = description.tokenizers[text_encodings(tuple(networks))[0].tokenizer]
    model = Model(networks=networks, tokenizers=description.tokenizers, scheduler_config=scheduler_config,
                  model_index=description.model_index, embeddings=words_in(first))
    return StableDiffusion(model, params)


def _folder_description(folder: str) -> Description:
    """A diffusers folder's configs, tokenizers, scheduler config and model_index (not its weights)."""
    model_index = read_model_index(folder)
    names = model_components(model_index)
    configs = {name: read_component_config(folder, name) for name in names if name in COMPONENTS}
    tokenizers = {name: load_tokenizer(storage.join(folder, name)) for name in names if name.startswith("tokenizer")}
    scheduler_config = read_json(storage.join(folder, "scheduler", "scheduler_config.json"))
    return Description("folder", configs, tokenizers, scheduler_config, model_index)


__all__ = ["Model", "StableDiffusion", "load", "save", "CLIPTextConfig", "UNetConfig", "VAEConfig"]
