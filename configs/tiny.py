"""A tiny model trained from scratch on the built-in shapes dataset: the CPU smoke run and test config
(small_scratch.py's tiny variant, run long enough to see the loss fall).

    python train.py --config configs/tiny.py --workdir runs/tiny
"""

from sdjax.train.recipes import scratch_config


def get_config(arg: str | None = None):
    c = scratch_config(tiny=True)
    c.total_steps = 60
    c.data.shapes.num_examples = 256
    c.data.shapes.num_test_examples = 16
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 5
    c.optimizer.ema_decay = 0.99
    c.checkpoint.every_steps = 20
    c.log.every_steps = 5
    c.log.preview_every_steps = 30
    c.log.preview_steps = 4
    return c


def sweep(add):
    for lr in (3e-4, 1e-3):
        add(**{"optimizer.learning_rate": lr})
