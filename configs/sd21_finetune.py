"""Fine-tune Stable Diffusion 2.1 (768, v-prediction: taken from the checkpoint's scheduler config).

    python train.py --config configs/sd21_finetune.py --workdir runs/sd21 \\
        --config.model.pretrained=/path/to/stable-diffusion-2-1 --config.data.folder.src=/path/to/images

`:tiny` gives the CPU variant.
"""

from sdjax.train.recipes import finetune_config, finetune_sweep, shrink_for_cpu


def get_config(arg: str | None = None):
    c = finetune_config()
    c.data.resolution = 768
    c.batch_size = 16
    c.log.preview_steps = 25
    if arg == "tiny":
        shrink_for_cpu(c)
    return c


sweep = finetune_sweep
