"""Import and export of Stable Diffusion checkpoints in the diffusers folder layout.

    model_index.json
    text_encoder/ config.json  model.safetensors
    tokenizer/    vocab.json  merges.txt  tokenizer_config.json  special_tokens_map.json
    unet/         config.json  diffusion_pytorch_model.safetensors
    vae/          config.json  diffusion_pytorch_model.safetensors
    scheduler/    scheduler_config.json

Weights load strictly (every tensor used, every parameter found, shapes equal). Pickle weights
(.bin/.ckpt) are read only with allow_pickle=True, because unpickling can run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from sdjax.convert.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from sdjax.convert.state_dict import params_from_state_dict, state_dict_from_params
from sdjax import storage
from sdjax.storage import staged_folder
from sdjax.tokenizer import save_tokenizer
from sdjax.models import (AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig,
                          VAEConfig, abstract_params)
from sdjax.models.clip_text import CLIPTextModelWithProjection, CLIPTextProjectionConfig

# Old diffusers VAE checkpoints name the middle-block attention projections differently.
_VAE_LEGACY_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _text_encoder_keys(key: str) -> str | None:
    # transformers 4 wrote "text_model." before every key, transformers 5 does not; both load.
    key = key.removeprefix("text_model.")
    return None if key == "embeddings.position_ids" else key  # a buffer, not a parameter


def _text_encoder_export_key(key: str) -> str:
    # transformers' CLIPText* models keep the tower under "text_model." and the projection beside it.
    return key if key.startswith("text_projection.") else "text_model." + key


def _vae_keys(key: str) -> str:
    for old, new in _VAE_LEGACY_NAMES.items():
        if "mid_block.attentions.0" in key:
            key = key.replace(old, new)
    return key


@dataclasses.dataclass(frozen=True)
class Component:
    """How one network sits in the folder: its config class, module, weight file and key conventions."""

    config_cls: type
    module_cls: type
    weights: str                       # file stem: <weights>.safetensors
    class_names: tuple[str, ...]       # accepted _class_name / architectures in config.json
    library: str                       # for model_index.json
    normalize_key: Callable[[str], str | None]  # checkpoint key -> our key (None: skip)
    export_key: Callable[[str], str] = lambda key: key  # our key -> the key written


COMPONENTS: dict[str, Component] = {
    "text_encoder": Component(CLIPTextConfig, CLIPTextModel, "model", ("CLIPTextModel",), "transformers",
                              _text_encoder_keys, _text_encoder_export_key),
    "text_encoder_2": Component(CLIPTextProjectionConfig, CLIPTextModelWithProjection, "model",
                                ("CLIPTextModelWithProjection",), "transformers", _text_encoder_keys,
                                _text_encoder_export_key),
    "vae": Component(VAEConfig, AutoencoderKL, "diffusion_pytorch_model", ("AutoencoderKL",), "diffusers",
                     _vae_keys),
    "unet": Component(UNetConfig, UNet2DConditionModel, "diffusion_pytorch_model", ("UNet2DConditionModel",),
                      "diffusers", lambda key: key),
}


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from `path` (local or remote), or a CheckpointError naming the file."""
    if not storage.is_remote(path) and not os.path.isfile(path):
        raise CheckpointError(f"{path}: not found")
    try:
        raw = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):  # remote: one request, not two
        raise CheckpointError(f"{path}: not found") from None
    except OSError as e:  # no permission, a store's error
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        value = json.loads(bytes(raw).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


# model_index.json "_class_name" -> (the components sdjax needs, those it reads where the index names them).
# Others (a safety checker, an image encoder) are left alone.
_SD = (("text_encoder", "tokenizer", "unet", "vae", "scheduler"), ())
# SDXL base has both text encoders; the refiner only the second (its index gives text_encoder [null, null]).
_SDXL = (("text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler"), ("text_encoder", "tokenizer"))
PIPELINES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "StableDiffusionPipeline": _SD, "StableDiffusionImg2ImgPipeline": _SD, "StableDiffusionInpaintPipeline": _SD,
    "StableDiffusionXLPipeline": _SDXL, "StableDiffusionXLImg2ImgPipeline": _SDXL,
    "StableDiffusionXLInpaintPipeline": _SDXL,
}
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


def read_model_index(folder: str) -> dict[str, Any]:
    """model_index.json of a diffusers pipeline folder, checked to name a known pipeline whose components
    are present with classes sdjax reads."""
    if not storage.isdir(folder):
        raise CheckpointError(f"{folder}: not a directory")
    storage.check_complete(folder)  # a cut-off upload to a store
    index_path = storage.join(folder, "model_index.json")
    if not storage.isfile(index_path):
        raise CheckpointError(f"{folder}: not a diffusers checkpoint folder (model_index.json not found)")
    index = read_json(index_path)
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINES:
        raise CheckpointError(f"{index_path}: pipeline {pipeline!r} is not one sdjax reads "
                              f"(known: {', '.join(PIPELINES)})")
    required, optional = PIPELINES[pipeline]
    for name in required + optional:
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            if name in optional:
                continue
            raise CheckpointError(f"{index_path}: component {name!r} is missing")
        known = (COMPONENTS[name].class_names if name in COMPONENTS
                 else TOKENIZER_CLASSES if name.startswith("tokenizer") else None)
        if known is not None and entry[1] not in known:
            raise CheckpointError(f"{index_path}: component {name!r} has class {entry[1]!r}; sdjax reads "
                                  f"{' or '.join(known)}")
        if not storage.isdir(storage.join(folder, name)):
            raise CheckpointError(f"{storage.join(folder, name)}: component folder not found")
    present = model_components(index)
    for encoder in (n for n in present if n.startswith("text_encoder")):
        if encoder.replace("text_encoder", "tokenizer") not in present:
            raise CheckpointError(f"{index_path}: component {encoder!r} has no "
                                  f"{encoder.replace('text_encoder', 'tokenizer')!r}")
    return index


def model_components(index: dict[str, Any]) -> tuple[str, ...]:
    """The components sdjax reads from a folder with this (checked) model_index.json."""
    required, optional = PIPELINES[index["_class_name"]]
    named = lambda name: isinstance(index.get(name), list) and len(index[name]) == 2 and index[name][1] is not None
    return required + tuple(name for name in optional if named(name))


def read_component_config(folder: str, name: str) -> Any:
    """The typed model config of component `name` (a key of COMPONENTS) in a pipeline folder."""
    component = COMPONENTS[name]
    path = storage.join(folder, name, "config.json")
    raw = read_json(path)
    declared = raw.get("_class_name") or (raw.get("architectures") or [None])[0]
    if declared is not None and declared not in component.class_names:
        raise CheckpointError(f"{path}: declares {declared!r}; sdjax expects {' or '.join(component.class_names)}")
    try:
        return component.config_cls.from_dict(raw, path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _read_weights(directory: str, stem: str, variant: str | None, allow_pickle: bool) -> tuple[dict, str]:
    stem = f"{stem}.{variant}" if variant else stem
    single = storage.join(directory, f"{stem}.safetensors")
    if storage.isfile(single):
        return read_safetensors(single), single
    index_path = single + ".index.json"
    if storage.isfile(index_path):  # sharded: {"weight_map": {key: shard file}}
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no weight_map")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(storage.join(directory, shard)))
        return tensors, index_path
    for ext in (".bin", ".ckpt", ".pt"):
        pickled = storage.join(directory, stem + ext)
        if storage.isfile(pickled):
            return read_pickle_weights(pickled, allow_pickle), pickled
    raise CheckpointError(f"{single}: not found (no weights for this component)")


def read_pickle_weights(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch pickle (its "state_dict" where it wraps one), as numpy arrays; refused
    unless the user allows pickles. A remote file is read into memory first (torch.load needs a seekable
    file)."""
    if not allow_pickle:
        raise CheckpointError(f"{path}: pickle weights are not read by default because unpickling can run code; "
                              "pass allow_pickle=True if you trust this file")
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading pickle weights needs PyTorch installed") from None
    state = torch.load(storage.readable(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def load_component(folder: str, name: str, *, dtype: Any = np.float32, variant: str | None = None,
                   allow_pickle: bool = False, place: Callable[[np.ndarray], Any] | None = None) -> tuple[Any, Any]:
    """(config, params) of component `name` from a pipeline folder; params as numpy arrays of `dtype`, or
    what `place` (e.g. jnp.asarray) makes of each, placed one at a time so that host memory holds about one
    tensor beside the placed ones."""
    component = COMPONENTS[name]
    storage.check_complete(folder)  # a cut-off upload to a store (read_model_index checks it for whole models)
    config = read_component_config(folder, name)
    tensors, source = _read_weights(storage.join(folder, name), component.weights, variant, allow_pickle)
    state_dict = {}
    for key, value in tensors.items():
        ours = component.normalize_key(key)
        if ours is not None:
            state_dict[ours] = value
    shapes = abstract_params(component.module_cls(config))
    return config, params_from_state_dict(shapes, state_dict, source, dtype=dtype, place=place)


def default_model_index(scheduler_class: str, pipeline: str = "StableDiffusionPipeline") -> dict[str, Any]:
    """model_index.json of `pipeline` (without safety checker) with its components' usual classes."""
    index: dict[str, Any] = {"_class_name": pipeline}
    if PIPELINES[pipeline] == _SD:
        index.update(requires_safety_checker=False, feature_extractor=[None, None], safety_checker=[None, None])
    for name in PIPELINES[pipeline][0]:
        index[name] = (["diffusers", scheduler_class] if name == "scheduler"
                       else ["transformers", TOKENIZER_CLASSES[0]] if name.startswith("tokenizer")
                       else [COMPONENTS[name].library, COMPONENTS[name].class_names[0]])
    return index


def _write_component(folder: str, name: str, config: Any, params: Any, dtype: Any) -> None:
    component = COMPONENTS[name]
    os.makedirs(os.path.join(folder, name))
    _write_json(os.path.join(folder, name, "config.json"), config.to_dict())
    tensors = {component.export_key(k): cast_floats(v, dtype) for k, v in state_dict_from_params(params).items()}
    write_safetensors(os.path.join(folder, name, component.weights + ".safetensors"), tensors)


def save_pipeline(folder: str, *, configs: dict[str, Any], params: dict[str, Any], tokenizers: dict[str, Any],
                  scheduler_config: dict[str, Any], model_index: dict[str, Any] | None = None,
                  dtype: Any = None) -> None:
    """Writes a diffusers pipeline folder atomically: each network of `configs` with its `params`, each
    tokenizer, the scheduler config; `dtype` (e.g. np.float16) casts float weights."""
    with staged_folder(folder) as staging:
        scheduler_class = scheduler_config.get("_class_name", "PNDMScheduler")
        index = dict(model_index or default_model_index(scheduler_class))
        _write_json(os.path.join(staging, "model_index.json"), index)
        for name, config in configs.items():
            _write_component(staging, name, config, params[name], dtype)
        os.makedirs(os.path.join(staging, "scheduler"))
        _write_json(os.path.join(staging, "scheduler", "scheduler_config.json"), scheduler_config)
        for name, tokenizer in tokenizers.items():
            save_tokenizer(tokenizer, os.path.join(staging, name))


def save_components(folder: str, *, configs: dict[str, Any], params: dict[str, Any], tokenizer: Any = None,
                    extra: Callable[[str], None] | None = None) -> None:
    """Writes some components of a pipeline (a training stage's output, e.g. only vae/) atomically in
    the same layout, so `load_component` and later stages read them; `extra(staging)` adds files."""
    with staged_folder(folder) as staging:
        for name in configs:
            _write_component(staging, name, configs[name], params[name], None)
        if tokenizer is not None:
            save_tokenizer(tokenizer, os.path.join(staging, "tokenizer"))
        if extra is not None:
            extra(staging)


def cast_floats(array: np.ndarray, dtype: Any) -> np.ndarray:
    """`array` cast to `dtype` if it is a float array and dtype is given (integer buffers keep theirs)."""
    return array.astype(dtype) if dtype is not None and jnp.issubdtype(array.dtype, jnp.floating) else array


def _write_json(path: str, value: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
