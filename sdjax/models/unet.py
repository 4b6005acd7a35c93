"""UNet2DConditionModel of Stable Diffusion 1.x/2.x and SDXL: noisy latents + timestep + text (+ SDXL's pooled
text and time ids) -> noise (or v) prediction."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.config import config_value, reject_unsupported
from sdjax.models.layers import Dtype, conv, dense, group_norm
from sdjax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from sdjax.models.transformer_2d import Transformer2DModel
from sdjax.parallel import constrain

ACTIVATION_AXES = ("batch", None, None, None)  # NHWC activations between blocks

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# Options of diffusers' UNet2DConditionModel outside the SD 1.x/2.x/XL family, with the values we implement.
_UNSUPPORTED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu", "swish"),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None, "text_time"),
    "encoder_hid_dim": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "timestep_post_act": (None,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1),
    "mid_block_scale_factor": (1, 1.0),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}


def _per_level(raw: dict[str, Any], key: str, default: int, levels: int, source: str) -> tuple[int, ...]:
    """A setting given once for all levels or as a list with one entry per level."""
    value = raw.get(key, default)
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
    if len(values) != levels or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{source}: {key}={value!r}; expected a positive int or a list of {levels} of them "
                         f"(one per entry of block_out_channels)")
    return values


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of diffusers' UNet2DConditionModel (config.json keys), per-level values expanded.

    Defaults are diffusers' defaults, which a config.json without the key gets.
    """

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    upcast_attention: bool = False
    # SDXL's added conditioning ("text_time"): the pooled text embedding and sinusoidal embeddings of the
    # time ids (sizes, crop, aesthetic score), projected and added to the timestep embedding.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "UNetConfig":
        """Builds the config from a diffusers config.json dict; `source` names the file in errors."""
        reject_unsupported(raw, _UNSUPPORTED, source)
        raw = dict(raw)
        # diffusers' historical naming: for SD 1.x/2.x `attention_head_dim` holds the number of heads.
        if raw.get("num_attention_heads") is None:
            raw["num_attention_heads"] = raw.get("attention_head_dim", 8)
        if isinstance(raw.get("cross_attention_dim"), list):
            raise ValueError(f"{source}: per-block cross_attention_dim is not supported by sdjax")
        per_level = {"layers_per_block": 2, "transformer_layers_per_block": 1, "num_attention_heads": 8}
        kwargs = {f.name: config_value(raw, f.name, f.default, source)
                  for f in dataclasses.fields(cls) if f.name not in per_level}
        levels = len(kwargs["block_out_channels"])
        kwargs.update({key: _per_level(raw, key, default, levels, source) for key, default in per_level.items()})
        for key, known in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            for t in kwargs[key]:
                if t not in known:
                    raise ValueError(f"{source}: {key} has unknown block type {t!r} (supported: {', '.join(known)})")
            if len(kwargs[key]) != levels:
                raise ValueError(f"{source}: {key} has {len(kwargs[key])} entries but block_out_channels has {levels}")
        cfg = cls(**kwargs)
        if cfg.addition_embed_type == "text_time" and not (cfg.addition_time_embed_dim
                                                            and cfg.projection_class_embeddings_input_dim):
            raise ValueError(f"{source}: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        for channels, heads in zip(cfg.block_out_channels, cfg.num_attention_heads):
            if channels % heads:
                raise ValueError(f"{source}: block_out_channels {channels} is not divisible by {heads} heads")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The diffusers config.json form."""
        out = dataclasses.asdict(self)
        out["attention_head_dim"] = out.pop("num_attention_heads")  # what SD 1.x/2.x/XL checkpoints write
        if self.addition_embed_type is None:  # SD 1.x/2.x configs do not carry SDXL's keys
            for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                del out[key]
        return dict(out, _class_name="UNet2DConditionModel", act_fn="silu", mid_block_type="UNetMidBlock2DCrossAttn")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), in float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class UNetBlock(nn.Module):
    """One down or up level: (ResNet [+ Transformer2D]) x num_layers, then a resampler.

    Down levels return every intermediate output as a skip; up levels consume one skip per layer,
    concatenated on channels after the running features (the reference's order).
    """

    config: UNetConfig
    channels: int
    num_layers: int
    transformer_layers: int
    heads: int
    cross_attention: bool
    resample: str | None  # "down" | "up" | None
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nhwc: jax.Array, temb: jax.Array, context_blc: jax.Array,
                 skips: list[jax.Array] | None = None, upsample_size: tuple[int, int] | None = None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        transformer_cls = nn.remat(Transformer2DModel) if self.remat else Transformer2DModel
        outputs = []
        for i in range(self.num_layers):
            if skips is not None:
                x_nhwc = jnp.concatenate([x_nhwc, skips.pop()], axis=-1)
            x_nhwc = resnet_cls(self.channels, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{i}", **kw)(
                x_nhwc, temb)
            if self.cross_attention:
                x_nhwc = transformer_cls(
                    self.heads, self.channels // self.heads, self.transformer_layers, cfg.norm_num_groups,
                    cfg.use_linear_projection, cfg.upcast_attention, self.attention_impl,
                    name=f"attentions_{i}", **kw)(x_nhwc, context_blc)
            outputs.append(x_nhwc)
        if self.resample == "down":
            x_nhwc = Downsample2D(self.channels, asymmetric_pad=cfg.downsample_padding == 0,
                                  name="downsamplers_0", **kw)(x_nhwc)
            outputs.append(x_nhwc)
        elif self.resample == "up":
            x_nhwc = Upsample2D(self.channels, name="upsamplers_0", **kw)(x_nhwc, upsample_size)
        # Block boundary: keep activations batch-sharded (a no-op unless a mesh and rules are active).
        return constrain(x_nhwc, ACTIVATION_AXES), outputs


class MidBlock(nn.Module):
    config: UNetConfig
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nhwc: jax.Array, temb: jax.Array, context_blc: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        transformer_cls = nn.remat(Transformer2DModel) if self.remat else Transformer2DModel
        channels, heads = x_nhwc.shape[-1], cfg.num_attention_heads[-1]
        x_nhwc = resnet_cls(channels, cfg.norm_num_groups, cfg.norm_eps, name="resnets_0", **kw)(x_nhwc, temb)
        x_nhwc = transformer_cls(heads, channels // heads, cfg.transformer_layers_per_block[-1], cfg.norm_num_groups,
                                 cfg.use_linear_projection, cfg.upcast_attention, self.attention_impl,
                                 name="attentions_0", **kw)(x_nhwc, context_blc)
        x_nhwc = resnet_cls(channels, cfg.norm_num_groups, cfg.norm_eps, name="resnets_1", **kw)(x_nhwc, temb)
        return constrain(x_nhwc, ACTIVATION_AXES)


class TimestepEmbedding(nn.Module):
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(dense(self.features, (None, "embed"), name="linear_1", **kw)(x))
        return dense(self.features, ("embed", "embed_out"), name="linear_2", **kw)(x)


class UNet2DConditionModel(nn.Module):
    """(latents (B, h, w, C), timesteps (B,) or scalar, text states (B, L, D)) -> prediction (B, h, w, C_out).

    A UNet with SDXL's added conditioning (addition_embed_type "text_time") also takes `text_embeds`
    (B, P), the pooled text embedding, and `time_ids` (B, n): original size, crop top-left and target
    size (base) or aesthetic score (refiner).
    """

    config: UNetConfig
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents_nhwc: jax.Array, timesteps: jax.Array, context_blc: jax.Array,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(attention_impl=self.attention_impl, remat=self.remat, **kw)
        batch = latents_nhwc.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        temb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(temb.astype(self.dtype))
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (addition_embed_type 'text_time', SDXL) needs text_embeds and time_ids")
            width = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
            if width != cfg.projection_class_embeddings_input_dim:
                raise ValueError(f"text_embeds {text_embeds.shape} and {time_ids.shape[-1]} time ids give {width} "
                                 f"features; this UNet takes {cfg.projection_class_embeddings_input_dim} "
                                 "(projection_class_embeddings_input_dim)")
            time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                             cfg.freq_shift).reshape(batch, -1)
            added = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1).astype(self.dtype)
            temb = temb + TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **kw)(added)

        x = latents_nhwc
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = conv(cfg.block_out_channels[0], 3, padding=1, name="conv_in", **kw)(x)
        skips = [x]
        levels = len(cfg.block_out_channels)
        for i, kind in enumerate(cfg.down_block_types):
            x, outputs = UNetBlock(
                cfg, cfg.block_out_channels[i], cfg.layers_per_block[i], cfg.transformer_layers_per_block[i],
                cfg.num_attention_heads[i], kind == "CrossAttnDownBlock2D", "down" if i < levels - 1 else None,
                name=f"down_blocks_{i}", **block)(x, temb, context_blc)
            skips += outputs

        x = MidBlock(cfg, name="mid_block", **block)(x, temb, context_blc)

        for i, kind in enumerate(cfg.up_block_types):
            level = levels - 1 - i
            num_layers = cfg.layers_per_block[level] + 1
            level_skips, skips = skips[-num_layers:], skips[:-num_layers]
            upsample_size = skips[-1].shape[1:3] if i < levels - 1 else None
            x, _ = UNetBlock(
                cfg, cfg.block_out_channels[level], num_layers, cfg.transformer_layers_per_block[level],
                cfg.num_attention_heads[level], kind == "CrossAttnUpBlock2D", "up" if i < levels - 1 else None,
                name=f"up_blocks_{i}", **block)(x, temb, context_blc, level_skips, upsample_size)

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, padding=1, name="conv_out", **kw)(x)
