"""Fine-tune SDXL base 1.0 (any SDXL base diffusers folder) on a folder of captioned images at 1024².

    python train.py --config configs/sdxl_finetune.py --workdir runs/sdxl \\
        --config.model.pretrained=/path/to/stable-diffusion-xl-base-1.0 --config.data.folder.src=/path/to/images

As SDXL trains: each image's stored size and random-crop corner become its time ids (the target size is
data.resolution), and a dropped caption (10%) zeroes both text encoders' embeddings, which is what the
sampler gives for "no negative prompt". model.train_text_encoder trains both text encoders.
bf16 + remat, min-SNR 5, EMA; the export is a diffusers SDXL folder. An SDXL refiner cannot be
fine-tuned with this (it conditions on per-image aesthetic scores).

`:tiny` gives the CPU variant (32x32 shapes, batch 2, a few steps) for any tiny SDXL folder.
"""

from sdjax.train.recipes import finetune_config, shrink_for_cpu


def get_config(arg: str | None = None):
    c = finetune_config()
    c.data.resolution = 1024
    c.batch_size = 16
    c.optimizer.learning_rate = 1e-6
    c.log.preview_steps = 30
    c.log.preview_guidance = 5.0
    if arg == "tiny":
        shrink_for_cpu(c)
    return c


def sweep(add) -> None:
    """SDXL's full fine-tuning wants smaller learning rates than SD 1.x."""
    for lr in (5e-7, 1e-6, 2e-6):
        add(**{"optimizer.learning_rate": lr})
