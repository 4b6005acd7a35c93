"""Single-file checkpoints in the original LDM layout (what A1111 and ComfyUI load): one safetensors file
with every network under its component prefix, keys as sdjax.convert.ldm names them.

    model.diffusion_model.*            the UNet
    first_stage_model.*                the VAE (mid-block attention as 1x1 convolutions)
    cond_stage_model.transformer.*     SD 1.x's CLIP ViT-L text encoder (transformers' keys)

Written for SD 1.x models (a CLIP text encoder in transformers' layout). SD 2.x and SDXL store their
OpenCLIP text encoders in OpenCLIP's own layout (fused attention projections, `resblocks`), which this
module does not write yet: it refuses them by name rather than write a file other tools misread.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Mapping

import numpy as np

from sdjax.convert.diffusers import COMPONENTS, cast_floats
from sdjax.convert.ldm import VAE_CONV_ATTENTION, ldm_keys
from sdjax.convert.safetensors_io import CheckpointError, write_safetensors
from sdjax.convert.state_dict import state_dict_from_params

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."}


def check_writable(configs: Mapping[str, Any]) -> None:
    """Raises CheckpointError unless the networks are an SD 1.x model this layout holds."""
    if set(configs) != set(PREFIXES):
        raise CheckpointError(f"single-file export holds SD 1.x models (text_encoder, unet, vae); this model has "
                              f"{', '.join(sorted(configs))} (SDXL and refiners are not written as single files yet)")
    text = configs["text_encoder"]
    if text.hidden_act != "quick_gelu":  # SD 2.x: OpenCLIP ViT-H, stored in OpenCLIP's own layout
        raise CheckpointError("single-file export: the text encoder is OpenCLIP's (SD 2.x, hidden_act "
                              f"{text.hidden_act!r}), whose single-file layout is not written yet; save a diffusers "
                              "folder instead")


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
