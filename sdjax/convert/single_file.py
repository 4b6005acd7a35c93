"""Single-file checkpoints in the original LDM layout (what A1111 and ComfyUI load): one safetensors file
with every network under its component prefix, keys as sdjax.convert.ldm names them.

    model.diffusion_model.*            the UNet
    first_stage_model.*                the VAE (mid-block attention as 1x1 convolutions)
    cond_stage_model.transformer.*     SD 1.x's CLIP ViT-L text encoder (transformers' keys)
    model_ema.*                        the UNet's EMA weights, where saved (read with ema=True)

Read and written for SD 1.x models (a CLIP text encoder in transformers' layout). SD 2.x and SDXL store
their OpenCLIP text encoders in OpenCLIP's own layout (fused attention projections, `resblocks`), which
this module does not handle yet: it refuses them by name rather than misread or write a file other tools
misread. Reading is strict: every tensor is used except exactly those IGNORED_KEYS lists (and the EMA
or the non-EMA UNet weights, whichever is not chosen).
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Mapping

import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict

from sdjax.convert.diffusers import COMPONENTS, cast_floats, read_pickle_weights
from sdjax.convert.ldm import VAE_CONV_ATTENTION, ldm_keys
from sdjax.convert.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from sdjax.convert.state_dict import (params_from_state_dict, some_keys, state_dict_from_params, torch_key,
                                      torch_shape)
from sdjax.models import abstract_params

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."}


# The noise schedule's buffers (LDM's DDPM registers them), the EMA's bookkeeping and CLIP's position-id
# buffer: in single files, but no weights of ours.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
IGNORED_KEYS = frozenset(SCHEDULE_BUFFERS + ("model_ema.decay", "model_ema.num_updates",
                                             "cond_stage_model.transformer.text_model.embeddings.position_ids"))
_EMA = "model_ema."
_OTHER_FAMILIES = {"cond_stage_model.model.": "SD 2.x (OpenCLIP text encoder)",
                   "conditioner.embedders.": "SDXL (two text encoders under conditioner.embedders)"}


def ema_key(key: str) -> str:
    """The EMA copy's key of a UNet weight: LDM's EMA drops the dots ("model.diffusion_model.out.2.weight"
    -> "model_ema.diffusion_modelout2weight")."""
    return _EMA + key.removeprefix("model.").replace(".", "")


def _read(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        tensors = read_safetensors(path)
    elif path.endswith((".ckpt", ".pt", ".bin")):
        if not allow_pickle:
            raise CheckpointError(f"{path}: pickle weights are not read by default because unpickling can run "
                                  "code; pass allow_pickle=True if you trust this file")
        tensors = read_pickle_weights(path)
    else:
        raise CheckpointError(f"{path}: not a single-file checkpoint (.safetensors, or .ckpt with allow_pickle)")
    # Files from before transformers put the text tower under "text_model.".
    old = "cond_stage_model.transformer."
    return {(old + "text_model." + k[len(old):] if k.startswith(old) and not k.startswith(old + "text_model.")
             else k): v for k, v in tensors.items()}


def read_single_file(path: str, configs: Mapping[str, Any], *, ema: bool = False, dtype: Any = np.float32,
                     place: Callable[[np.ndarray], Any] | None = None,
                     allow_pickle: bool = False) -> dict[str, Any]:
    """The parameters of each network of `configs` (SD 1.x: text_encoder, unet, vae) from the single file at
    `path`, strictly; with `ema` the UNet's EMA weights. Values as load_component gives them (`dtype`,
    placed one at a time by `place`)."""
    tensors = _read(path, allow_pickle)
    for prefix, family in _OTHER_FAMILIES.items():
        if any(k.startswith(prefix) for k in tensors):
            raise CheckpointError(f"{path}: a {family} single file; sdjax reads SD 1.x single files so far")
    check_writable(configs)
    if ema and not any(k.startswith(_EMA) and k not in IGNORED_KEYS for k in tensors):
        raise CheckpointError(f"{path}: ema=True, but the file holds no EMA weights (no model_ema.* tensors)")
    used, params = set(), {}
    for name, prefix in PREFIXES.items():
        component = COMPONENTS[name]
        shapes = abstract_params(component.module_cls(configs[name]))
        flat = flatten_dict(unfreeze(shapes))
        ours = {component.export_key(torch_key(p)): torch_key(p) for p in flat}
        expected = {torch_key(p): torch_shape(p, tuple(leaf.shape)) for p, leaf in flat.items()}
        state, missing = {}, []
        for key, ldm_key in ldm_keys(name, configs[name], ours).items():
            stored = prefix + ldm_key
            if ema and name == "unet":
                stored = ema_key(stored)
            if stored not in tensors:
                missing.append(stored)
                continue
            found, want = tuple(tensors[stored].shape), expected[ours[key]]
            if found != want and found != want + (1, 1):  # + (1, 1): the VAE's attention as 1x1 convolutions
                raise CheckpointError(f"{path}: tensor {stored!r} has shape {found}; the model config expects {want}")
            state[ours[key]] = tensors[stored]
            used.add(stored)
        if missing:
            raise CheckpointError(f"{path}: missing tensor(s) {some_keys(missing)} that the model config needs")
        params[name] = params_from_state_dict(shapes, state, path, dtype=dtype, place=place)
    skipped = "model.diffusion_model." if ema else _EMA  # the UNet weights not chosen
    unexpected = sorted(k for k in tensors if k not in used and k not in IGNORED_KEYS and not k.startswith(skipped))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {some_keys(unexpected)} that the model config does "
                              "not have")
    return params


def check_writable(configs: Mapping[str, Any]) -> None:
    """Raises CheckpointError unless the networks are an SD 1.x model this layout holds."""
    if set(configs) != set(PREFIXES):
        raise CheckpointError(f"single files hold SD 1.x models (text_encoder, unet, vae); this model has "
                              f"{', '.join(sorted(configs))} (SDXL and refiners are not written as single files yet)")
    text = configs["text_encoder"]
    if text.hidden_act != "quick_gelu":  # SD 2.x: OpenCLIP ViT-H, stored in OpenCLIP's own layout
        raise CheckpointError("single files: the text encoder is OpenCLIP's (SD 2.x, hidden_act "
                              f"{text.hidden_act!r}), whose single-file layout sdjax does not handle yet; use a "
                              "diffusers folder instead")


def single_file_state(configs: Mapping[str, Any], params: Mapping[str, Any],
                      dtype: Any = None) -> dict[str, np.ndarray]:
    """Every tensor of the model under its single-file key (host arrays, `dtype` casting float weights)."""
    check_writable(configs)
    tensors = {}
    for name, prefix in PREFIXES.items():
        state = {COMPONENTS[name].export_key(k): v for k, v in state_dict_from_params(params[name]).items()}
        for key, ldm_key in ldm_keys(name, configs[name], state).items():
            value = state[key]
            if name == "vae" and VAE_CONV_ATTENTION.search(ldm_key):
                value = value[:, :, None, None]
            tensors[prefix + ldm_key] = cast_floats(value, dtype)
    return tensors


def save_single_file(path: str, configs: Mapping[str, Any], params: Mapping[str, Any], dtype: Any = None) -> None:
    """Writes the model as one new .safetensors file at `path` (written beside it and renamed into place,
    so an interrupted export leaves no file); an existing file is not replaced."""
    path = os.path.abspath(path)
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: a single-file export is a .safetensors file")
    if os.path.exists(path):
        raise CheckpointError(f"{path}: already exists; export to a new file")
    tensors = single_file_state(configs, params, dtype)
    staging = os.path.join(os.path.dirname(path), f".sdjax-export-{uuid.uuid4().hex}.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        write_safetensors(staging, tensors)
        os.rename(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise
