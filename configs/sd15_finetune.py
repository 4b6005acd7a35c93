"""Fine-tune Stable Diffusion 1.5 (any SD 1.x diffusers folder) on a folder of captioned images.

    python train.py --config configs/sd15_finetune.py --workdir runs/sd15 \\
        --config.model.pretrained=/path/to/stable-diffusion-v1-5 --config.data.folder.src=/path/to/images

`:tiny` gives the CPU variant (32x32 shapes, batch 2, a few steps) for any small diffusers folder.
"""

from sdjax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.seed = 0
    c.model.pretrained = ""          # required
    c.model.architecture = ""        # never from scratch
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.total_steps = 15000
    c.batch_size = 32
    c.data.source = "folder"
    c.data.resolution = 512
    c.data.crop = "random"
    c.data.caption_dropout = 0.1
    c.loss.min_snr_gamma = 5.0
    c.optimizer.learning_rate = 1e-5
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 500
    c.optimizer.ema_decay = 0.9999
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep_every = 5000
    c.log.every_steps = 50
    c.log.preview_every_steps = 1000
    c.log.preview_steps = 30
    c.log.preview_guidance = 7.5
    c.log.preview_prompts = ("a photograph of an astronaut riding a horse", "a watercolor fox in the snow")
    if arg == "tiny":
        shrink_for_cpu(c)
    return c


def shrink_for_cpu(c):
    """The CPU smoke variant: float32, tiny shapes data, a few steps."""
    c.model.dtype = "float32"
    c.model.remat = False
    c.total_steps = 4
    c.batch_size = 2
    c.data.source = "shapes"
    c.data.resolution = 32
    c.data.shapes.num_examples = 64
    c.data.shapes.num_test_examples = 8
    c.optimizer.warmup_steps = 1
    c.checkpoint.every_steps = 2
    c.log.every_steps = 1
    c.log.preview_every_steps = 0


def sweep(add):
    for lr in (5e-6, 1e-5, 2e-5):
        add(**{"optimizer.learning_rate": lr})
