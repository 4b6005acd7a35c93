"""A small latent diffusion model trained from scratch on the built-in shapes dataset (64x64).

    python train.py --config configs/small_scratch.py --workdir runs/small

`:tiny` gives the CPU smoke variant (the tiny architecture, 32x32, a few steps).
"""

from sdjax.train.recipes import scratch_config, scratch_sweep


def get_config(arg: str | None = None):
    return scratch_config(tiny=arg == "tiny")


sweep = scratch_sweep
