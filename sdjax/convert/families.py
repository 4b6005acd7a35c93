"""The Stable Diffusion family a single file holds, told from its keys and shapes, and that family's
description as shipped with sdjax: network configs, tokenizers, scheduler and model_index (no download).

    family        told by (a key only its files hold)                      networks as the preset
    sdxl          conditioner.embedders.1.model.ln_final.weight             sdxl
    sdxl_refiner  conditioner.embedders.0.model.ln_final.weight             sdxl_refiner
    sd2           cond_stage_model.model.ln_final.weight                    sd21
    sd1           cond_stage_model.transformer.text_model.final_layer_norm.weight   sd15

The UNet's input convolution (model.diffusion_model.input_blocks.0.0.weight) gives its input channels:
4, or 9 for an inpainting model. Everything else must then fit the preset exactly (the reader is strict).

Prediction type (what the UNet predicts): given by the caller where known; else v_prediction for a file
that carries a `v_pred` marker key (as some v-prediction fine-tunes do) and for SD 2.x (the 768 models,
2.0-v and 2.1, are the SD 2 files people hold: a 512-base file needs prediction_type="epsilon"), and
epsilon for SD 1.x and SDXL. The schedulers are those of each family's reference folder: PNDM for SD 1.x
and SD 2 epsilon, DDIM for SD 2 v-prediction, Euler (leading spacing) for SDXL; all with SD's
scaled-linear betas 0.00085..0.012 over 1000 steps and steps_offset 1. A file with a `ztsnr` marker
(trained with zero terminal SNR) gets betas rescaled to it and "trailing" timestep spacing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from sdjax.convert.diffusers import COMPONENTS, default_model_index
from sdjax.convert.safetensors_io import CheckpointError
from sdjax.models.presets import PIPELINE_OPTIONS, preset

PREDICTION_TYPES = ("epsilon", "v_prediction")
# Marker tensors some fine-tunes carry (as ComfyUI reads them): "v_pred" -> v-prediction, "ztsnr" -> trained
# with zero terminal SNR (the scheduler rescales its betas to it and spaces timesteps "trailing").
V_PRED_MARKER, ZERO_SNR_MARKER = "v_pred", "ztsnr"
# Files of models that look like a family but are not run as one: refused by name.
REFUSED = {"edm_mean": "Playground v2.5 (an EDM model with SDXL's networks)"}
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"

# (family, a key only its files hold), tried in this order; keys as single_file.read_tensors gives them.
SIGNATURES = (
    ("sdxl", "conditioner.embedders.1.model.ln_final.weight"),
    ("sdxl_refiner", "conditioner.embedders.0.model.ln_final.weight"),
    ("sd2", "cond_stage_model.model.ln_final.weight"),
    ("sd1", "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
)
_PRESET = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl", "sdxl_refiner": "sdxl_refiner"}
# Each tokenizer's pad token: OpenAI's CLIP pads with its end token, OpenCLIP's with "!" (id 0).
_PADS = {"sd1": {"tokenizer": "eos"}, "sd2": {"tokenizer": "!"},
         "sdxl": {"tokenizer": "eos", "tokenizer_2": "!"}, "sdxl_refiner": {"tokenizer_2": "!"}}
_PIPELINES = {("sd1", 4): "StableDiffusionPipeline", ("sd1", 9): "StableDiffusionInpaintPipeline",
              ("sd2", 4): "StableDiffusionPipeline", ("sd2", 9): "StableDiffusionInpaintPipeline",
              ("sdxl", 4): "StableDiffusionXLPipeline", ("sdxl", 9): "StableDiffusionXLInpaintPipeline",
              ("sdxl_refiner", 4): "StableDiffusionXLImg2ImgPipeline"}
_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
          "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


@dataclasses.dataclass(frozen=True)
class Description:
    """What a diffusers folder would say about a model: typed network configs, tokenizers (by component
    name), scheduler config and model_index."""

    family: str
    configs: Mapping[str, Any]
    tokenizers: Mapping[str, Any]
    scheduler_config: Mapping[str, Any]
    model_index: Mapping[str, Any]


def detect(path: str, tensors: Mapping[str, Any]) -> tuple[str, int]:
    """(family, UNet input channels) of the single file at `path` with these tensors (keys and shapes only)."""
    refused = next((what for key, what in REFUSED.items() if key in tensors), None)
    if refused:
        raise CheckpointError(f"{path}: a {refused} checkpoint, which sdjax does not run")
    family = next((name for name, key in SIGNATURES if key in tensors), None)
    if family is None:
        raise CheckpointError(f"{path}: not a Stable Diffusion single file sdjax knows: it holds none of the keys "
                              f"that tell the families apart ({', '.join(key for _, key in SIGNATURES)})")
    if CONV_IN not in tensors:
        raise CheckpointError(f"{path}: {family} text encoder found but no UNet (no tensor {CONV_IN!r})")
    shape = tuple(tensors[CONV_IN].shape)
    channels = shape[1] if len(shape) == 4 else None
    if (family, channels) not in _PIPELINES:
        raise CheckpointError(f"{path}: tensor {CONV_IN!r} has shape {shape}: a UNet of {channels} input channels; "
                              f"sdjax reads {family} files with "
                              f"{' or '.join(str(c) for f, c in _PIPELINES if f == family)}")
    return family, channels


def check_prediction_type(value: str) -> str:
    if value not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {value!r}")
    return value


def prediction_type_of(family: str, tensors: Mapping[str, Any], prediction_type: str | None) -> str:
    """The prediction type: `prediction_type` if given, else the rule of the module docstring."""
    if prediction_type is not None:
        return check_prediction_type(prediction_type)
    return "v_prediction" if V_PRED_MARKER in tensors or family == "sd2" else "epsilon"


def describe_file(path: str, tensors: Mapping[str, Any], prediction_type: str | None = None) -> Description:
    """The shipped description of the model in the single file at `path` (its `tensors`, keys and shapes)."""
    family, in_channels = detect(path, tensors)
    return describe(family, in_channels, prediction_type_of(family, tensors, prediction_type),
                    zero_snr=ZERO_SNR_MARKER in tensors)


def describe(family: str, in_channels: int, prediction_type: str, zero_snr: bool = False) -> Description:
    """The shipped description of a family's model with this UNet input and prediction type (`zero_snr`:
    trained with zero terminal SNR)."""
    from sdjax.tokenizer import clip_tokenizer

    raw = preset(_PRESET[family])
    raw["unet"] = dict(raw["unet"], in_channels=in_channels)
    if family == "sd2" and prediction_type == "epsilon":  # SD 2 base: 512² (the v models: 768²)
        raw["unet"]["sample_size"], raw["vae"]["sample_size"] = 64, 512
    configs = {name: COMPONENTS[name].config_cls.from_dict(config, f"shipped {family}/{name}")
               for name, config in raw.items()}
    scheduler = ("EulerDiscreteScheduler" if family.startswith("sdxl")
                 else "DDIMScheduler" if prediction_type == "v_prediction" else "PNDMScheduler")
    scheduler_config = {"_class_name": scheduler, **_BETAS, "prediction_type": prediction_type}
    if scheduler == "PNDMScheduler":
        scheduler_config["skip_prk_steps"] = True
    if scheduler == "EulerDiscreteScheduler":
        scheduler_config.update(interpolation_type="linear", use_karras_sigmas=False)
    if zero_snr:
        scheduler_config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipeline = _PIPELINES[family, in_channels]
    model_index = {**default_model_index(scheduler, pipeline), **PIPELINE_OPTIONS.get(family, {}),
                   "_class_name": pipeline}
    if family == "sdxl_refiner":
        model_index.update(text_encoder=[None, None], tokenizer=[None, None])
    tokenizers = {name: clip_tokenizer(pad) for name, pad in _PADS[family].items()}
    return Description(family, configs, tokenizers, scheduler_config, model_index)
