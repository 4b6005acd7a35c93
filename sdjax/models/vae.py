"""AutoencoderKL: images (NHWC, [-1, 1]) <-> diagonal-Gaussian latents (NHWC)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.attention import multi_head_attention
from sdjax.models.config import config_value, reject_unsupported
from sdjax.models.layers import Dtype, conv, dense, group_norm
from sdjax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyperparameters of diffusers' AutoencoderKL (config.json keys)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # diffusers decodes a float16 VAE that sets this in float32 (SD's and SDXL's VAEs overflow float16).
    force_upcast: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "VAEConfig":
        """Builds the config from a diffusers config.json dict; `source` names the file in errors."""
        reject_unsupported(raw, {"act_fn": ("silu", "swish"), "shift_factor": (None,),
                                 "latents_mean": (None,), "latents_std": (None,)}, source)
        cfg = cls(**{f.name: config_value(raw, f.name, f.default, source) for f in dataclasses.fields(cls)})
        levels = len(cfg.block_out_channels)
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(cfg, key)
            for t in types:
                if t != kind:
                    raise ValueError(f"{source}: {key} has unknown block type {t!r} (supported: {kind!r})")
            if len(types) != levels:
                raise ValueError(f"{source}: {key} has {len(types)} entries but block_out_channels has {levels}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The diffusers config.json form."""
        out = dict(dataclasses.asdict(self), _class_name="AutoencoderKL", act_fn="silu")
        if self.force_upcast:  # diffusers' default: left out, as SD 1.x/2.x configs written before it leave it
            del out["force_upcast"]
        return out

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


class VAEAttention(nn.Module):
    """Single-head spatial self-attention in the VAE's middle block (GroupNorm, residual)."""

    groups: int
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nhwc: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x_nhwc.shape
        y = group_norm(self.groups, 1e-6, name="group_norm", **kw)(x_nhwc).reshape(b, h * w, c)
        # Same parameter names as diffusers' Attention, but flat in this block (no nested module).
        q, k, v = (dense(c, ("embed", "heads"), name=n, **kw)(y) for n in ("to_q", "to_k", "to_v"))
        y = multi_head_attention(q, k, v, 1, impl=self.attention_impl)
        y = dense(c, ("heads", "embed"), name="to_out_0", **kw)(y)
        return x_nhwc + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    config: VAEConfig
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nhwc: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x_nhwc.shape[-1]
        x_nhwc = ResnetBlock2D(channels, cfg.norm_num_groups, 1e-6, name="resnets_0", **kw)(x_nhwc)
        if cfg.mid_block_add_attention:
            x_nhwc = VAEAttention(cfg.norm_num_groups, self.attention_impl, name="attentions_0", **kw)(x_nhwc)
        return ResnetBlock2D(channels, cfg.norm_num_groups, 1e-6, name="resnets_1", **kw)(x_nhwc)


class ResnetStack(nn.Module):
    """A level of the encoder or decoder: `num` ResNet blocks, then an optional resampler."""

    channels: int
    num: int
    groups: int
    resample: str | None = None  # "down" | "up" | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nhwc: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num):
            x_nhwc = ResnetBlock2D(self.channels, self.groups, 1e-6, name=f"resnets_{i}", **kw)(x_nhwc)
        if self.resample == "down":
            x_nhwc = Downsample2D(self.channels, asymmetric_pad=True, name="downsamplers_0", **kw)(x_nhwc)
        elif self.resample == "up":
            x_nhwc = Upsample2D(self.channels, name="upsamplers_0", **kw)(x_nhwc)
        return x_nhwc


class Encoder(nn.Module):
    config: VAEConfig
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nhwc: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        stack = nn.remat(ResnetStack) if self.remat else ResnetStack
        x = conv(cfg.block_out_channels[0], 3, padding=1, name="conv_in", **kw)(x_nhwc)
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(cfg.block_out_channels):
            x = stack(channels, cfg.layers_per_block, cfg.norm_num_groups, "down" if i < last else None,
                      name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(cfg, self.attention_impl, name="mid_block", **kw)(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
        return conv(2 * cfg.latent_channels, 3, padding=1, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    config: VAEConfig
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z_nhwc: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        stack = nn.remat(ResnetStack) if self.remat else ResnetStack
        channels = cfg.block_out_channels[::-1]
        x = conv(channels[0], 3, padding=1, name="conv_in", **kw)(z_nhwc)
        x = MidBlock(cfg, self.attention_impl, name="mid_block", **kw)(x)
        last = len(channels) - 1
        for i, ch in enumerate(channels):
            x = stack(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, "up" if i < last else None,
                      name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, padding=1, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """`encode` gives the posterior (mean, logvar); `decode` maps latents back to images.

    Latents here are unscaled: multiply by `config.scaling_factor` before the UNet, divide after.
    """

    config: VAEConfig
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, self.attention_impl, self.remat, **kw)
        self.decoder = Decoder(cfg, self.attention_impl, self.remat, **kw)
        z2 = 2 * cfg.latent_channels
        self.quant_conv = conv(z2, 1, padding=0, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = (conv(cfg.latent_channels, 1, padding=0, **kw)
                                if cfg.use_post_quant_conv else None)

    def encode(self, images_nhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, C) in [-1, 1] -> posterior mean and log-variance, each (B, H/f, W/f, z)."""
        moments = self.encoder(images_nhwc)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents_nhwc: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, z) -> images (B, h*f, w*f, C), nominally in [-1, 1]."""
        if self.post_quant_conv is not None:
            latents_nhwc = self.post_quant_conv(latents_nhwc)
        return self.decoder(latents_nhwc)

    def __call__(self, images_nhwc: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode the posterior mean (or a sample when `rng` is given)."""
        mean, logvar = self.encode(images_nhwc)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return self.decode(z)
