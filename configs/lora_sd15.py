"""Train a LoRA on Stable Diffusion 1.5 (any SD 1.x/2.x diffusers folder) from a folder of
captioned images; the export is a kohya-format lora.safetensors that sdjax (sample.py --lora), diffusers'
load_lora_weights, A1111 and ComfyUI read.

    python train.py --config configs/lora_sd15.py --workdir runs/lora \\
        --config.model.pretrained=/path/to/stable-diffusion-v1-5 --config.data.folder.src=/path/to/images

Rank 16, alpha 8 on the UNet's attention and feed-forward layers (config.lora.unet_targets); add
--config.lora.text_encoder=True for text-encoder LoRAs too. `:tiny` is the CPU variant for any small
diffusers folder.
"""

from sdjax.train.recipes import lora_config, lora_sweep


def get_config(arg: str | None = None):
    return lora_config(tiny=arg == "tiny")


sweep = lora_sweep
