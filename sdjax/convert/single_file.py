"""Single-file checkpoints in the original LDM layout (what A1111 and ComfyUI load): one safetensors file
with every network under its component prefix.

    model.diffusion_model.*                  the UNet            } keys as sdjax.convert.ldm renames them
    first_stage_model.*                      the VAE             } (VAE attention as 1x1 convolutions)
    cond_stage_model.transformer.*           SD 1.x: CLIP ViT-L text, transformers' keys
    cond_stage_model.model.*                 SD 2.x: OpenCLIP ViT-H text, OpenCLIP's keys
    conditioner.embedders.0.transformer.*    SDXL base: CLIP ViT-L text, transformers' keys
    conditioner.embedders.1.model.*          SDXL base: OpenCLIP bigG text with its projection
    conditioner.embedders.0.model.*          SDXL refiner: OpenCLIP bigG text
    model_ema.*                              the UNet's EMA weights, where saved (read with ema=True)

OpenCLIP's layout fuses each layer's q/k/v projections into `attn.in_proj_weight` / `in_proj_bias`,
names the layers `transformer.resblocks.N` and stores `text_projection` transposed.

SD 2.x: the original text tower has 24 blocks, diffusers' text encoder (and ours) the 23 that SD 2.x runs
(it conditions on the penultimate layer) and no projection. Reading skips the 24th block and the
projection; writing writes the 23 blocks held, without `text_projection`.

Reading is strict: every tensor is used except exactly those `ignored` allows (the noise schedule's
buffers, the EMA's counters, position-id buffers, OpenCLIP's logit_scale, SD 2.x's unused block and
projection, and the EMA or the non-EMA UNet weights, whichever is not chosen).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict

from sdjax import storage
from sdjax.convert.diffusers import COMPONENTS, cast_floats, read_pickle_weights
from sdjax.convert.ldm import VAE_CONV_ATTENTION, ldm_keys
from sdjax.convert.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from sdjax.convert.state_dict import (params_from_state_dict, some_keys, state_dict_from_params, torch_key,
                                      torch_shape)
from sdjax.models import abstract_params

TRANSFORMERS, OPEN_CLIP, LDM = "transformers", "open_clip", "ldm"  # key layouts of a network in the file

# The noise schedule's buffers (LDM's DDPM registers them) and the EMA's bookkeeping: in single files,
# but no weights of ours.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
# "v_pred" and "ztsnr" are markers some fine-tunes carry (sdjax.convert.families reads them).
IGNORED_KEYS = frozenset(SCHEDULE_BUFFERS + ("model_ema.decay", "model_ema.num_updates", "v_pred", "ztsnr"))
_EMA = "model_ema."
_UNET = "model.diffusion_model."


def layout(configs: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Network name -> (its key prefix in the file, its key layout) for the model with these configs."""
    files = {"unet": (_UNET, LDM), "vae": ("first_stage_model.", LDM)}
    names = set(configs)
    if "text_encoder_2" in names:  # SDXL: base with both encoders, refiner with the second alone
        if "text_encoder" in names:
            files.update(text_encoder=("conditioner.embedders.0.transformer.", TRANSFORMERS),
                         text_encoder_2=("conditioner.embedders.1.model.", OPEN_CLIP))
        else:
            files.update(text_encoder_2=("conditioner.embedders.0.model.", OPEN_CLIP))
    elif "text_encoder" in names:  # SD 1.x: OpenAI's CLIP (quick_gelu); SD 2.x: OpenCLIP (gelu)
        sd1 = configs["text_encoder"].hidden_act == "quick_gelu"
        files.update(text_encoder=("cond_stage_model.transformer.", TRANSFORMERS) if sd1
                     else ("cond_stage_model.model.", OPEN_CLIP))
    if set(files) != names:
        raise CheckpointError(f"single files hold Stable Diffusion's networks (unet, vae, text encoders); this model "
                              f"has {', '.join(sorted(names))}")
    return files


_OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias", "text_projection.weight": "text_projection"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def open_clip_key(key: str) -> tuple[str, int | None]:
    """(OpenCLIP key, which third of it: 0/1/2 for q/k/v of the fused in_proj, else None) of a transformers
    CLIP text key."""
    if key in _OPEN_CLIP_TOP:
        return _OPEN_CLIP_TOP[key], None
    layer, module, leaf = _LAYER.match(key).groups()
    base = f"transformer.resblocks.{layer}."
    if module in _QKV:
        return f"{base}attn.in_proj_{leaf}", _QKV.index(module)
    return f"{base}{_OPEN_CLIP_LAYER[module]}.{leaf}", None


def _file_keys(name: str, kind: str, config: Any, keys) -> dict[str, tuple[str, int | None]]:
    """diffusers key -> (key in the file without prefix, third of a fused q/k/v or None) of network `name`."""
    if kind == OPEN_CLIP:
        return {key: open_clip_key(key) for key in keys}
    return {key: (ldm_key, None) for key, ldm_key in ldm_keys(name, config, keys).items()}


def ema_key(key: str) -> str:
    """The EMA copy's key of a UNet weight: LDM's EMA drops the dots ("model.diffusion_model.out.2.weight"
    -> "model_ema.diffusion_modelout2weight")."""
    return _EMA + key.removeprefix("model.").replace(".", "")


def _to_file(kind: str, file_key: str, value: np.ndarray) -> np.ndarray:
    """A diffusers-layout tensor as the file stores it: VAE attention as 1x1 convs, OpenCLIP's projection
    transposed."""
    if kind == LDM and VAE_CONV_ATTENTION.search(file_key):
        return value[:, :, None, None]
    return value.T if kind == OPEN_CLIP and file_key == "text_projection" else value


def _from_file(kind: str, file_key: str, value: np.ndarray) -> np.ndarray:
    """The reverse of _to_file (VAE attention also accepted as plain matrices)."""
    if kind == LDM and VAE_CONV_ATTENTION.search(file_key) and value.ndim == 4:
        return value[:, :, 0, 0]
    return value.T if kind == OPEN_CLIP and file_key == "text_projection" else value


def read_tensors(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The tensors of a single file (memory-mapped for safetensors), CLIP text keys in today's form."""
    if path.endswith(".safetensors"):
        tensors = read_safetensors(path)
    elif path.endswith((".ckpt", ".pt", ".bin")):
        tensors = read_pickle_weights(path, allow_pickle)
    else:
        raise CheckpointError(f"{path}: not a single-file checkpoint (.safetensors, or .ckpt with allow_pickle)")
    # Files from before transformers put the CLIP text tower under "text_model.".
    fixed = {}
    for key, value in tensors.items():
        for old in ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."):
            if key.startswith(old) and not key.startswith(old + "text_model."):
                key = old + "text_model." + key[len(old):]
        fixed[key] = value
    return fixed


def _ignored(key: str, files: Mapping[str, tuple[str, str]], configs: Mapping[str, Any], ema: bool) -> bool:
    """Whether a tensor of the file is knowingly left unused (see the module docstring)."""
    if key in IGNORED_KEYS or key.startswith(_UNET if ema else _EMA):
        return True
    for name, (prefix, kind) in files.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if kind == TRANSFORMERS:
            return rest == "text_model.embeddings.position_ids"
        if kind == OPEN_CLIP:
            config = configs[name]
            block = re.match(r"transformer\.resblocks\.(\d+)\.", rest)
            projection = name == "text_encoder_2"  # SD 2.x's text encoder has no projection
            return (rest == "logit_scale" or (rest == "text_projection" and not projection)
                    or (block is not None and int(block.group(1)) >= config.num_hidden_layers))
    return False


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One weight of ours and where the file keeps it."""

    network: str
    key: str                # our PyTorch-layout key (torch_key of the Flax path)
    shape: tuple[int, ...]  # its PyTorch-layout shape
    prefix: str             # the network's prefix in the file
    file_key: str           # the key in the file after the prefix
    third: int | None       # q/k/v: which third of the fused projection it is
    kind: str               # the network's key layout

    @property
    def stored(self) -> str:
        return self.prefix + self.file_key


def _entries(configs: Mapping[str, Any], abstract: Mapping[str, Any]) -> list[_Entry]:
    """Every weight of the networks of `configs` (abstract: their abstract parameter trees), file order."""
    entries = []
    for name, (prefix, kind) in layout(configs).items():
        flat = flatten_dict(unfreeze(abstract[name]))
        shapes = {torch_key(p): torch_shape(p, tuple(leaf.shape)) for p, leaf in flat.items()}
        exported = {COMPONENTS[name].export_key(key): key for key in shapes}
        for key, (file_key, third) in _file_keys(name, kind, configs[name], exported).items():
            entries.append(_Entry(name, exported[key], shapes[exported[key]], prefix, file_key, third, kind))
    return entries


def _abstract(configs: Mapping[str, Any]) -> dict[str, Any]:
    return {name: abstract_params(COMPONENTS[name].module_cls(config)) for name, config in configs.items()}


def single_file_shapes(configs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor key of the model's single file and its shape, allocating nothing (for checks at full size)."""
    shapes = {}
    for e in _entries(configs, _abstract(configs)):
        shape = _to_file(e.kind, e.file_key, np.broadcast_to(np.bool_(False), e.shape)).shape
        shapes[e.stored] = shape if e.third is None else (3 * shape[0], *shape[1:])
    return shapes


def single_file_params(path: str, tensors: Mapping[str, np.ndarray], configs: Mapping[str, Any], *,
                       ema: bool = False, dtype: Any = np.float32,
                       place: Callable[[np.ndarray], Any] | None = None) -> dict[str, Any]:
    """The parameters of each network of `configs` from the `tensors` of the single file at `path`
    (read_tensors), strictly; with `ema` the UNet's EMA weights. Values as load_component gives them
    (`dtype`, placed one at a time by `place`). Every check is made before anything is placed."""
    files = layout(configs)
    if ema and not any(k.startswith(_EMA) and k not in IGNORED_KEYS for k in tensors):
        raise CheckpointError(f"{path}: ema=True, but the file holds no EMA weights (no model_ema.* tensors)")
    abstract = _abstract(configs)
    used, missing, states = set(), [], {name: {} for name in files}
    for e in _entries(configs, abstract):
        stored = ema_key(e.stored) if ema and e.network == "unet" else e.stored
        if stored not in tensors:
            missing.append(stored)
            continue
        value = _from_file(e.kind, e.file_key, tensors[stored])
        if e.third is not None:  # one of q/k/v: a third of the fused projection's rows
            rows = value.shape[0] // 3
            value = value[e.third * rows:(e.third + 1) * rows]
        if tuple(value.shape) != e.shape:
            raise CheckpointError(f"{path}: tensor {stored!r} has shape {tuple(tensors[stored].shape)}, which does "
                                  f"not hold the {e.shape} of {e.network}'s {e.key!r}")
        states[e.network][e.key] = value
        used.add(stored)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {some_keys(missing)} that the model config needs")
    unexpected = sorted(k for k in tensors if k not in used and not _ignored(k, files, configs, ema))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {some_keys(unexpected)} that the model config does "
                              "not have")
    return {name: params_from_state_dict(abstract[name], states[name], path, dtype=dtype, place=place)
            for name in files}


def single_file_state(configs: Mapping[str, Any], params: Mapping[str, Any],
                      dtype: Any = None) -> dict[str, np.ndarray]:
    """Every tensor of the model under its single-file key (host arrays, `dtype` casting float weights)."""
    states = {name: state_dict_from_params(params[name]) for name in configs}
    tensors: dict[str, Any] = {}
    fused: dict[str, list] = {}
    for e in _entries(configs, _abstract(configs)):
        value = cast_floats(_to_file(e.kind, e.file_key, states[e.network][e.key]), dtype)
        if e.third is None:
            tensors[e.stored] = value
        else:
            fused.setdefault(e.stored, [None] * 3)[e.third] = value
    tensors.update({key: np.concatenate(parts) for key, parts in fused.items()})
    return tensors


def save_single_file(path: str, configs: Mapping[str, Any], params: Mapping[str, Any], dtype: Any = None) -> None:
    """Writes the model as one new .safetensors file at `path` (written beside it and renamed into place,
    so an interrupted export leaves no file); an existing file is not replaced."""
    path = storage.absolute(path)
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: a single-file export is a .safetensors file")
    if storage.exists(path):
        raise CheckpointError(f"{path}: already exists; export to a new file")
    tensors = single_file_state(configs, params, dtype)
    with storage.staged_file(path, suffix=".safetensors") as staging:
        write_safetensors(staging, tensors)
