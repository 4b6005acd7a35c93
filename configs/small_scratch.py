"""A small latent diffusion model trained from scratch on the built-in shapes dataset (64x64).

    python train.py --config configs/small_scratch.py --workdir runs/small

`:tiny` gives the CPU smoke variant (the tiny architecture, 32x32, a few steps).
"""

from sdjax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.seed = 0
    c.model.architecture = "small"
    c.total_steps = 20000
    c.batch_size = 64
    c.data.source = "shapes"
    c.data.resolution = 64
    c.data.shapes.num_examples = 20000
    c.data.caption_dropout = 0.1
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 500
    c.optimizer.ema_decay = 0.999
    c.checkpoint.every_steps = 1000
    c.log.every_steps = 50
    c.log.preview_every_steps = 1000
    if arg == "tiny":
        c.model.architecture = "tiny"
        c.total_steps = 4
        c.batch_size = 4
        c.data.resolution = 32
        c.data.shapes.num_examples = 64
        c.data.shapes.num_test_examples = 8
        c.checkpoint.every_steps = 2
        c.log.every_steps = 1
        c.log.preview_every_steps = 0
    return c


def sweep(add):
    for lr in (1e-4, 3e-4):
        for gamma in (0.0, 5.0):
            add(**{"optimizer.learning_rate": lr, "loss.min_snr_gamma": gamma})
