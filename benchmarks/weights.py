"""The shared random-weight checkpoint: built once per preset with PyTorch, saved as a diffusers folder
(safetensors) that diffusers and `sdjax.load` both read, and reused while its marker matches the preset.

    python -m benchmarks.weights PRESET FOLDER     (what benchmarks.run starts in its own process)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from sdjax.models.presets import preset as preset_architecture
from sdjax.train.build import SD_SCHEDULE

MARKER = "benchmark-weights.json"  # written last: a folder without it was never completed


def architecture(preset: str) -> dict[str, dict]:
    """The preset's network configs by component name (an unknown name is an error naming --preset)."""
    return preset_architecture(preset, "--preset")


def vae_factor(arch: dict[str, dict]) -> int:
    """Pixels per latent along a side: the VAE halves the resolution between its levels."""
    return 2 ** (len(arch["vae"]["block_out_channels"]) - 1)


def native_resolution(arch: dict[str, dict]) -> int:
    """The image side the UNet was configured for."""
    return arch["unet"]["sample_size"] * vae_factor(arch)


def _marker(preset: str) -> dict:
    return {"preset": preset, "architecture": architecture(preset)}


def is_built(preset: str, folder: str) -> bool:
    """Whether `folder` holds complete weights of this preset's current architecture."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return json.load(f) == _marker(preset)
    except (OSError, ValueError):
        return False


def check_folder(folder: str) -> None:
    """Raises ValueError if building into `folder` would replace something that is not benchmark weights."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--cache-dir: {folder} is a file, not a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.isfile(os.path.join(folder, MARKER)):
        raise ValueError(f"--cache-dir: {folder} is not empty and holds no benchmark weights; "
                         "remove it or choose another")


def _constructor_kwargs(config: dict) -> dict:
    """A config.json dict minus the keys the constructors reject ("_class_name", "architectures")."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def build(preset: str, folder: str) -> None:
    """Builds the preset with torch's default random init (seed 0) and saves it to `folder`, replacing
    stale weights of an earlier build; any other existing non-empty folder is an error."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdjax.tokenizer import write_bpe_tokenizer

    folder = os.path.abspath(folder)
    check_folder(folder)
    arch = architecture(preset)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    # Written beside the target and renamed into place, so an interrupted build leaves nothing half-done.
    staging = tempfile.mkdtemp(prefix=".bench-weights-", dir=os.path.dirname(folder))
    try:
        # A byte-level BPE without merges: any prompt tokenizes, and ids stay below SD's vocabulary size.
        tokenizer = write_bpe_tokenizer(os.path.join(staging, "_tokenizer"))
        text = _constructor_kwargs(arch["text_encoder"])
        if not text["vocab_size"]:  # scratch-size presets take the vocabulary from the tokenizer
            text.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        common = dict(vae=AutoencoderKL(**_constructor_kwargs(arch["vae"])),
                      text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer,
                      unet=UNet2DConditionModel(**_constructor_kwargs(arch["unet"])),
                      scheduler=DDIMScheduler(**_constructor_kwargs(SD_SCHEDULE)))
        if "text_encoder_2" in arch:  # SDXL base: both tokenizers are the one byte-level BPE
            encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_constructor_kwargs(arch["text_encoder_2"])))
            pipe = StableDiffusionXLPipeline(**common, text_encoder_2=encoder_2, tokenizer_2=tokenizer)
        else:
            pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.save_pretrained(staging, safe_serialization=True)
        shutil.rmtree(os.path.join(staging, "_tokenizer"))
        with open(os.path.join(staging, MARKER), "w") as f:
            json.dump(_marker(preset), f, indent=1)
        if os.path.isdir(folder):
            shutil.rmtree(folder)  # stale weights of ours (checked above), or an empty folder
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


if __name__ == "__main__":
    try:
        build(*sys.argv[1:3])
    except ValueError as e:
        print(f"benchmarks.weights: error: {e}", file=sys.stderr)
        sys.exit(2)
