"""Training recipes that configs build on (configs/*.py call these and change what differs), so a config
file imports only the library, never another config file."""

from __future__ import annotations

import ml_collections

from sdjax.train.config import base_config


def finetune_config(tiny: bool = False) -> ml_collections.ConfigDict:
    """Fine-tuning a checkpoint (model.pretrained) on a folder of captioned images at 512², bf16 + remat,
    min-SNR loss, EMA; `tiny`: the CPU smoke variant (see shrink_for_cpu)."""
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
    if tiny:
        shrink_for_cpu(c)
    return c


def shrink_for_cpu(c: ml_collections.ConfigDict) -> None:
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


def finetune_sweep(add) -> None:
    """The learning rates worth trying when fine-tuning."""
    for lr in (5e-6, 1e-5, 2e-5):
        add(**{"optimizer.learning_rate": lr})


def scratch_config(tiny: bool = False) -> ml_collections.ConfigDict:
    """A small latent diffusion model from scratch on the built-in shapes dataset (64x64); `tiny`: the
    CPU smoke variant (the tiny architecture, 32x32, a few steps)."""
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
    if tiny:
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


def scratch_sweep(add) -> None:
    """Learning rate x min-SNR gamma for training from scratch."""
    for lr in (1e-4, 3e-4):
        for gamma in (0.0, 5.0):
            add(**{"optimizer.learning_rate": lr, "loss.min_snr_gamma": gamma})


def lora_config(tiny: bool = False) -> ml_collections.ConfigDict:
    """A LoRA on a checkpoint (model.pretrained): rank 16, alpha 8, kohya's default targets (the UNet's
    transformer blocks), lr 1e-4 (LoRAs take far larger steps than full fine-tuning), no EMA (the
    factors start at zero and move fast), export kohya-format lora.safetensors."""
    c = finetune_config(tiny=False)
    c.lora.rank = 16
    c.lora.alpha = 8.0
    c.total_steps = 2000
    c.batch_size = 8
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.0
    c.optimizer.ema_decay = 0.0
    c.checkpoint.every_steps = 500
    c.checkpoint.keep_every = 0
    c.log.preview_every_steps = 500
    if tiny:
        shrink_for_cpu(c)
        c.lora.rank, c.lora.alpha = 4, 2.0
    return c


def lora_sweep(add) -> None:
    """The learning rates and ranks worth trying for a LoRA."""
    for lr in (5e-5, 1e-4, 2e-4):
        add(**{"optimizer.learning_rate": lr})


def textual_inversion_config(tiny: bool = False) -> ml_collections.ConfigDict:
    """Textual inversion on a checkpoint (model.pretrained) from a folder of images of one concept, captioned
    by textual_inversion.template: one new word, every network frozen, only its embedding rows trained
    (lr 5e-3, no weight decay, no EMA), exported as diffusers' learned_embeds.safetensors and an A1111
    embedding. `tiny`: the shipped shapes model learns "<tri>" for triangles (initialised from "shape"),
    on the shapes data with "triangle" in the captions replaced by the token."""
    c = finetune_config(tiny=False)
    c.textual_inversion.token = "<concept>"
    c.textual_inversion.initializer = "object"
    c.textual_inversion.template = "a photo of {}"
    c.total_steps = 3000
    c.batch_size = 8
    c.data.caption_dropout = 0.0
    c.loss.min_snr_gamma = 0.0
    c.optimizer.learning_rate = 5e-3
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    c.optimizer.ema_decay = 0.0
    c.checkpoint.every_steps = 500
    c.checkpoint.keep_every = 0
    c.log.preview_every_steps = 500
    c.log.preview_prompts = ("a photo of <concept>", "a watercolor painting of <concept>")
    if tiny:
        from sdjax import DEFAULT_MODEL

        shrink_for_cpu(c)
        c.model.pretrained = DEFAULT_MODEL
        c.textual_inversion.token = "<tri>"
        c.textual_inversion.initializer = "shape"
        c.textual_inversion.template = ""
        c.textual_inversion.replace = "triangle"
        c.data.resolution = 64
        c.data.shapes.num_examples = 2000
        c.total_steps = 300
        c.batch_size = 16
        c.optimizer.learning_rate = 2e-2
        c.checkpoint.every_steps = 100
        c.log.every_steps = 25
        c.log.preview_prompts = ("a large red <tri> on a white background",)
    return c
