"""The training config schema: every key train.py understands, with its default.

Config files (configs/*.py) start from `base_config()` and change values; `check_keys` then
rejects any key the schema does not have, so a typo is an error instead of a silent default.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from sdjax.cli import unknown_key_message
from sdjax.data.source import default_data_config
from sdjax.parallel import mesh_config


def base_config() -> ml_collections.ConfigDict:
    """All training settings with their defaults."""
    c = ml_collections.ConfigDict()
    c.task = "unet"                 # what the run trains: "unet" (diffusion), "vae", "clip" (contrastive) or
                                    # "tokenizer" (BPE merges learnt from the data's captions)
    c.seed = 0                      # params init, noise, timesteps; the data order has its own seed below
    c.total_steps = 1000
    c.batch_size = 8                # global batch (all hosts and devices)
    c.grad_accum_steps = 1          # the batch is split into this many micro-batches, scanned

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""         # a diffusers folder to fine-tune; "" = from scratch with `architecture`
    c.model.architecture = "tiny"   # a preset of sdjax.models.presets.PRESETS (from scratch only)
    c.model.tokenizer = ""          # from scratch: a tokenizer folder; "" = byte-level BPE (no merges)
    c.model.vae_from = ""           # from scratch: a folder with a trained vae/ (e.g. a vae run's export)
    c.model.text_encoder_from = ""  # from scratch: a folder with text_encoder/ + tokenizer/ (a clip run's export)
    c.model.clip = ml_collections.ConfigDict({  # task "clip": the image tower (a ViT) and the shared space
        "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "projection_dim": 64})
    c.model.prediction_type = ""    # "" = the checkpoint's scheduler config (epsilon for new models)
    c.model.train_text_encoder = False
    c.model.dtype = "float32"       # compute dtype; parameters and optimizer state stay float32
    c.model.remat = False           # rematerialise UNet blocks in the backward pass
    c.lora = ml_collections.ConfigDict()  # task "unet": train a LoRA instead of the whole UNet (rank > 0)
    c.lora.rank = 0                 # 0 = off (full fine-tuning)
    c.lora.alpha = 0.0              # the delta is (alpha / rank) * up @ down; 0 = rank (a multiplier of 1)
    c.lora.unet_targets = ""        # regex searched in the UNet's module paths; "" = sdjax.lora.UNET_TARGETS
    c.lora.text_encoder = False     # also LoRAs on the text encoder(s)
    c.lora.text_targets = ""        # regex for the text encoders' module paths; "" = sdjax.lora.TEXT_TARGETS
    c.textual_inversion = ml_collections.ConfigDict()  # task "unet": learn a new word, every network frozen
    c.textual_inversion.token = ""        # the new word, e.g. "<my-cat>"; "" = off
    c.textual_inversion.initializer = ""  # a word whose embedding its vectors start from (required with token)
    c.textual_inversion.vectors = 1       # embedding vectors (tokens) the word stands for
    c.textual_inversion.template = ""     # e.g. "a photo of {}": every caption becomes this with the token
    c.textual_inversion.replace = ""      # else: this word in the data's captions becomes the token
    c.model.attention_impl = "auto"

    c.data = default_data_config()
    c.mesh = mesh_config()          # data / fsdp / tensor sizes and the logical-axis rules

    c.loss = ml_collections.ConfigDict()
    c.loss.min_snr_gamma = 0.0      # 0 = plain MSE; Hang et al. 2023 suggest 5
    c.loss.offset_noise = 0.0       # per-channel offset added to the noise (0.05-0.1 for darker/brighter images)
    c.loss.l1_weight = 1.0          # task "vae": reconstruction = l1_weight * L1 + l2_weight * MSE (per pixel)
    c.loss.l2_weight = 1.0
    c.loss.kl_weight = 1e-6         # task "vae": weight of the posterior's KL to N(0, I), per pixel
    c.loss.crop = 0                 # task "vae": train on random crops of this side (0 = whole images)

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"           # held-out split scored at the end of a vae / clip run (PSNR / retrieval)
    c.eval.num_examples = 256       # how many of its examples (fewer if the split is smaller)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "cosine"  # "cosine" (after warmup, to end_factor) or "constant" (after warmup)
    c.optimizer.warmup_steps = 100
    c.optimizer.end_factor = 0.0     # cosine end value, as a fraction of learning_rate
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 1e-2
    c.optimizer.grad_clip_norm = 1.0  # 0 = no clipping
    c.optimizer.ema_decay = 0.9999    # 0 = no EMA (the export then uses the trained params)
    c.optimizer.max_bad_steps = 10    # non-finite losses in a row before the run stops

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.keep_last = 3
    c.checkpoint.keep_every = 0       # also keep every K-th step's checkpoint forever (0 = none)
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10
    c.log.preview_every_steps = 500   # 0 = no previews
    c.log.preview_prompts = ("a small red circle on a blue background", "a large yellow square on a black background")
    c.log.preview_steps = 20
    c.log.preview_guidance = 5.0
    c.log.progress_bar = True

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.num_merges = -1       # task "tokenizer": merges to learn (-1 = until min_frequency stops it)
    c.tokenizer.min_frequency = 2     # a pair seen fewer times is never merged
    c.tokenizer.num_captions = 0      # captions read from data.split (0 = all)

    c.export = ml_collections.ConfigDict()
    c.export.at_end = True            # write workdir/export (diffusers layout, EMA weights) when done
    return c


def check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict | None = None,
               prefix: str = "") -> None:
    """Raises ValueError naming the first key of `config` that the schema does not have."""
    schema = base_config() if schema is None else schema
    for key, value in config.items():
        name = prefix + key
        if key not in schema:
            raise ValueError(unknown_key_message(name, schema.keys()))
        if isinstance(value, ml_collections.ConfigDict) != isinstance(schema[key], ml_collections.ConfigDict):
            raise ValueError(f"config key {name!r}: expected "
                             f"{'a group' if isinstance(schema[key], ml_collections.ConfigDict) else 'a value'}")
        if isinstance(value, ml_collections.ConfigDict):
            check_keys(value, schema[key], name + ".")


def sweep_points(module: Any) -> list[dict[str, Any]]:
    """The sweep a config file declares with `sweep(add)`: a list of {dotted key: value} overrides.

    Each call add(**{"optimizer.learning_rate": 1e-4}) declares one point. Files without `sweep`
    have none.
    """
    points: list[dict[str, Any]] = []
    declare: Callable[..., Any] | None = getattr(module, "sweep", None)
    if declare is not None:
        declare(lambda **overrides: points.append(dict(overrides)))
    return points


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-key overrides; an unknown key is an error."""
    config = ml_collections.ConfigDict(config.to_dict())
    for dotted, value in overrides.items():
        *groups, leaf = dotted.split(".")
        node = config
        for group in groups:
            if group not in node:
                raise ValueError(f"sweep override {dotted!r}: unknown config group {group!r}")
            node = node[group]
        if leaf not in node:
            raise ValueError(f"sweep override {dotted!r}: {unknown_key_message(leaf, node.keys())}")
        node[leaf] = value
    return config
