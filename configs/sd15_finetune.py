"""Fine-tune Stable Diffusion 1.5 (any SD 1.x diffusers folder) on a folder of captioned images.

    python train.py --config configs/sd15_finetune.py --workdir runs/sd15 \\
        --config.model.pretrained=/path/to/stable-diffusion-v1-5 --config.data.folder.src=/path/to/images

`:tiny` gives the CPU variant (32x32 shapes, batch 2, a few steps) for any small diffusers folder.
"""

from sdjax.train.recipes import finetune_config, finetune_sweep


def get_config(arg: str | None = None):
    return finetune_config(tiny=arg == "tiny")


sweep = finetune_sweep
