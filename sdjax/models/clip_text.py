"""CLIP text transformer (SD1: OpenAI CLIP ViT-L/14 text; SD2: OpenCLIP ViT-H/14 text as diffusers stores it;
SDXL: both ViT-L and OpenCLIP bigG, the latter with its text projection)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.attention import Attention
from sdjax.models.config import config_value
from sdjax.models.layers import Dtype, activation, dense, embed, layer_norm


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyperparameters of the text tower, as in transformers' CLIPTextConfig."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "CLIPTextConfig":
        """Builds the config from a transformers config.json dict; `source` names the file in errors."""
        kwargs = {f.name: config_value(raw, f.name, f.default, source) for f in dataclasses.fields(cls)}
        cfg = cls(**kwargs)
        activation(cfg.hidden_act, f"{source}: hidden_act")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by "
                             f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The transformers config.json form."""
        return dict(dataclasses.asdict(self), architectures=["CLIPTextModel"], model_type="clip_text_model")


@dataclasses.dataclass(frozen=True)
class CLIPTextProjectionConfig(CLIPTextConfig):
    """transformers' CLIPTextConfig of a CLIPTextModelWithProjection (SDXL's text_encoder_2)."""

    projection_dim: int = 512

    def to_dict(self) -> dict[str, Any]:
        return dict(super().to_dict(), architectures=["CLIPTextModelWithProjection"])


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig  # or any config with the same transformer fields (the vision tower's)
    attention_impl: str = "xla"
    causal: bool = True     # text attends left to right; image patches attend to all
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_blc: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads = cfg.num_attention_heads
        h = layer_norm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x_blc)
        x_blc = x_blc + Attention(
            heads, cfg.hidden_size // heads, cfg.hidden_size, qkv_bias=True, causal=self.causal,
            names=("q_proj", "k_proj", "v_proj", "out_proj"), attention_impl=self.attention_impl,
            name="self_attn", **kw)(h)
        h = layer_norm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x_blc)
        h = MLP(cfg, name="mlp", **kw)(h)
        return x_blc + h


class MLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        x = activation(cfg.hidden_act, "hidden_act")(x)
        return dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(x)


class CLIPEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), name="token_embedding", **kw)
        positions = embed(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"),
                          name="position_embedding", **kw)
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[1])[None])


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    attention_impl: str = "xla"
    remat: bool = False
    causal: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_blc: jax.Array) -> list[jax.Array]:
        """Every hidden state, as transformers' hidden_states: the input, then each layer's output."""
        layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        states = [x_blc]
        for i in range(self.config.num_hidden_layers):
            states.append(layer_cls(self.config, self.attention_impl, self.causal, name=f"layers_{i}",
                                    dtype=self.dtype, param_dtype=self.param_dtype)(states[-1]))
        return states


class CLIPTextModel(nn.Module):
    """Token ids (B, L) -> (hidden state (B, L, C), pooled EOS output (B, C)).

    The hidden state is the last one after the final LayerNorm (transformers' last_hidden_state), or
    with `hidden_layer` = k the raw transformers hidden_states[k] (SDXL takes -2: the penultimate layer's
    output, no final LayerNorm).
    """

    config: CLIPTextConfig
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, hidden_layer: int | None = None) -> tuple[jax.Array, jax.Array]:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions; the text encoder has "
                             f"{cfg.max_position_embeddings} (max_position_embeddings)")
        if hidden_layer is not None and not -cfg.num_hidden_layers - 1 <= hidden_layer <= cfg.num_hidden_layers:
            raise ValueError(f"hidden_layer {hidden_layer}: the text encoder has {cfg.num_hidden_layers + 1} "
                             "hidden states")
        x = CLIPEmbeddings(cfg, name="embeddings", **kw)(input_ids)
        states = CLIPEncoder(cfg, self.attention_impl, self.remat, name="encoder", **kw)(x)
        x = layer_norm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(states[-1])
        # transformers' rule: the legacy eos id 2 means "take the highest token id" (49407 is
        # the largest in CLIP's vocab); otherwise the first position holding eos_token_id.
        if cfg.eos_token_id == 2:
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            eos_index = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eos_index[:, None, None], axis=1)[:, 0]
        if isinstance(cfg, CLIPTextProjectionConfig):  # CLIPTextModelWithProjection: the projected EOS output
            pooled = dense(cfg.projection_dim, ("embed", "embed_out"), use_bias=False, name="text_projection",
                           **kw)(pooled)
        return (x if hidden_layer is None else states[hidden_layer]), pooled


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIPTextModel whose pooled output goes through the bias-free text_projection (its config's
    projection_dim wide): transformers' class of SDXL's text_encoder_2."""

    config: CLIPTextProjectionConfig
