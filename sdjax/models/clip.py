"""A CLIP dual encoder for training a text encoder from scratch: our CLIP text tower plus a small ViT.

    pixels (B, H, W, 3) in [-1, 1] -> ViT -> class token -> visual_projection -> unit image embedding
    token ids (B, L)                 -> CLIPTextModel -> pooled EOS -> text_projection -> unit text embedding
    logits = exp(logit_scale) * image_emb @ text_emb.T      (symmetric cross-entropy, Radford et al. 2021)

The text tower's parameters live under "text_model" in the layout of `CLIPTextModel`, so after
contrastive training they are exported as a Stable Diffusion text encoder as they are.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.clip_text import CLIPEncoder, CLIPTextConfig, CLIPTextModel
from sdjax.models.config import config_value
from sdjax.models.layers import Dtype, activation, conv, dense, layer_norm


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The image tower (transformers' CLIPVisionConfig fields that a ViT needs)."""

    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "CLIPVisionConfig":
        cfg = cls(**{f.name: config_value(raw, f.name, f.default, source) for f in dataclasses.fields(cls)})
        activation(cfg.hidden_act, f"{source}: hidden_act")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"{source}: image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by "
                             f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers and the width of the shared embedding space."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 64
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07

    def to_dict(self) -> dict[str, Any]:
        return {"text_config": self.text.to_dict(), "vision_config": self.vision.to_dict(),
                "projection_dim": self.projection_dim, "logit_scale_init_value": self.logit_scale_init}


class CLIPVisionModel(nn.Module):
    """Pixels (B, H, W, 3) -> pooled class-token features (B, hidden_size) (pre-LN ViT, as CLIP's)."""

    config: CLIPVisionConfig
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels_nhwc: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if pixels_nhwc.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"pixels are {pixels_nhwc.shape[1]}x{pixels_nhwc.shape[2]}; the vision tower takes "
                             f"{cfg.image_size}x{cfg.image_size} (image_size)")
        patches = conv(cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, padding="VALID",
                       name="patch_embedding", **kw)(pixels_nhwc)
        batch = patches.shape[0]
        x = patches.reshape(batch, -1, cfg.hidden_size)
        init = nn.initializers.normal(0.02)
        cls_token = self.param("class_embedding", nn.with_logical_partitioning(init, ("embed",)),
                               (cfg.hidden_size,), self.param_dtype)
        positions = self.param("position_embedding", nn.with_logical_partitioning(init, (None, "embed")),
                               (x.shape[1] + 1, cfg.hidden_size), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (batch, 1, cfg.hidden_size)), x], axis=1)
        x = layer_norm(cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x + positions.astype(x.dtype))
        x = CLIPEncoder(cfg, self.attention_impl, causal=False, name="encoder", **kw)(x)[-1]
        return layer_norm(cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])


class CLIPModel(nn.Module):
    """(pixels, token ids) -> (unit image embeddings (B, D), unit text embeddings (B, D), logit scale)."""

    config: CLIPConfig
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextModel(cfg.text, self.attention_impl, **kw)
        self.vision_model = CLIPVisionModel(cfg.vision, self.attention_impl, **kw)
        self.text_projection = dense(cfg.projection_dim, ("embed", None), use_bias=False, **kw)
        self.visual_projection = dense(cfg.projection_dim, ("embed", None), use_bias=False, **kw)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.logit_scale_init), ()), (), self.param_dtype)

    def encode_text(self, input_ids: jax.Array) -> jax.Array:
        """Unit-norm text embeddings (B, projection_dim), in float32."""
        return _unit(self.text_projection(self.text_model(input_ids)[1]))

    def encode_image(self, pixels_nhwc: jax.Array) -> jax.Array:
        """Unit-norm image embeddings (B, projection_dim), in float32."""
        return _unit(self.visual_projection(self.vision_model(pixels_nhwc)))

    def __call__(self, pixels_nhwc: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.encode_image(pixels_nhwc), self.encode_text(input_ids), self.logit_scale


def _unit(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


# CLIP clamps the learned scale so that the temperature never drops below 1/100.
MAX_LOGIT_SCALE = math.log(100.0)


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """The symmetric InfoNCE loss over the whole batch: image i's caption is text i, and vice versa.

    Under jit with the batch sharded, `image_emb @ text_emb.T` is over the GLOBAL batch (XLA gathers
    the other devices' embeddings), so every device contrasts against all B - 1 negatives.
    """
    scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
    logits = scale * image_emb @ text_emb.T
    labels = jnp.arange(logits.shape[0])
    log_p_text = jax.nn.log_softmax(logits, axis=1)[labels, labels]
    log_p_image = jax.nn.log_softmax(logits, axis=0)[labels, labels]
    return -(jnp.mean(log_p_text) + jnp.mean(log_p_image)) / 2
