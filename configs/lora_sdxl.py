"""Train a LoRA on SDXL base 1.0 (any SDXL base diffusers folder) from a folder of captioned
images at 1024²; the export is a kohya-format lora.safetensors (the UNet under the original block names,
as kohya's SDXL trainer writes them) that sdjax, diffusers, A1111 and ComfyUI read.

    python train.py --config configs/lora_sdxl.py --workdir runs/lora-xl \\
        --config.model.pretrained=/path/to/stable-diffusion-xl-base-1.0 --config.data.folder.src=/path/to/images

As SDXL fine-tuning trains (configs/sdxl_finetune.py): time ids from each image's size and crop, dropped
captions zero both encoders' embeddings. `:tiny` is the CPU variant for any tiny SDXL folder.
"""

from sdjax.train.recipes import lora_config, lora_sweep


def get_config(arg: str | None = None):
    c = lora_config(tiny=arg == "tiny")
    if arg != "tiny":
        c.data.resolution = 1024
        c.batch_size = 4
        c.log.preview_guidance = 5.0
    return c


sweep = lora_sweep
