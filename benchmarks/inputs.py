"""The random inputs both frameworks get, as numpy arrays in sdjax's channels-last layout (torch transposes)."""

from __future__ import annotations

import numpy as np

from benchmarks.settings import Settings

PROMPT = "a photograph of an astronaut riding a horse"
CONTEXT_TOKENS = 77  # CLIP's context length: the text sequence the UNet cross-attends to
TIMESTEP = 500


def unet_inputs(s: Settings, channels: int, cross_attention_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latents (2B, h, w, C), timesteps (2B,), text context (2B, 77, D)) for the guided batch of 2 x s.batch."""
    rng = np.random.default_rng(0)
    n, side = 2 * s.batch, s.unet_latent_side
    latents = rng.standard_normal((n, side, side, channels), dtype=np.float32)
    context = rng.standard_normal((n, CONTEXT_TOKENS, cross_attention_dim), dtype=np.float32)
    return latents, np.full((n,), TIMESTEP, np.int32), context


def added_inputs(s: Settings, unet_config) -> tuple[np.ndarray, np.ndarray] | None:
    """SDXL's added conditioning of the guided batch (2B): (a random pooled text embedding, the time ids of
    a square image at the UNet's side: original = target = that side, crop (0, 0)); None for SD 1.x/2.x.
    `unet_config` is either side's UNet config (the same attribute names)."""
    if unet_config.addition_embed_type != "text_time":
        return None
    side, n = s.unet_resolution, 2 * s.batch
    ids = np.asarray([side, side, 0, 0, side, side], np.float32)
    pooled_dim = unet_config.projection_class_embeddings_input_dim - len(ids) * unet_config.addition_time_embed_dim
    if pooled_dim <= 0:
        raise ValueError("benchmarks: the UNet does not take SDXL base's six time ids")
    pooled = np.random.default_rng(3).standard_normal((n, pooled_dim), dtype=np.float32)
    return pooled, np.tile(ids, (n, 1))


def decoder_latents(s: Settings, channels: int) -> np.ndarray:
    """(B, h, w, C) latents for the VAE decoder."""
    side = s.latent_side
    return np.random.default_rng(1).standard_normal((s.batch, side, side, channels), dtype=np.float32)


def training_pixels(s: Settings) -> np.ndarray:
    """(B, H, W, 3) images in [-1, 1] for a train step."""
    side = s.resolution
    return np.random.default_rng(2).uniform(-1, 1, (s.batch, side, side, 3)).astype(np.float32)
