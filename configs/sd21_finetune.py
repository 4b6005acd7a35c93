"""Fine-tune Stable Diffusion 2.1 (768, v-prediction: taken from the checkpoint's scheduler config).

    python train.py --config configs/sd21_finetune.py --workdir runs/sd21 \\
        --config.model.pretrained=/path/to/stable-diffusion-2-1 --config.data.folder.src=/path/to/images

`:tiny` gives the CPU variant.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sd15_finetune  # noqa: E402  (the shared fine-tuning recipe)


def get_config(arg: str | None = None):
    c = sd15_finetune.get_config()
    c.data.resolution = 768
    c.batch_size = 16
    c.log.preview_steps = 25
    if arg == "tiny":
        sd15_finetune.shrink_for_cpu(c)
    return c


sweep = sd15_finetune.sweep
