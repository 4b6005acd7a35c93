"""ResNet block and the LDM down/up samplers, shared by the VAE and the UNet (NHWC)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.layers import Dtype, conv, dense, group_norm, resize_nearest


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with an optional timestep embedding added between the convs.

    A 1x1 `conv_shortcut` appears when the channel count changes.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nhwc: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **kw)(x_nhwc))
        h = conv(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
        if temb is not None:
            t = dense(self.out_channels, ("embed", "conv_out"), name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", **kw)(h))
        h = conv(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
        if x_nhwc.shape[-1] != self.out_channels:
            x_nhwc = conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x_nhwc)
        return x_nhwc + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `asymmetric_pad` is the VAE's form: pad (0, 1) on H and W, then no padding."""

    channels: int
    asymmetric_pad: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nhwc: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric_pad else 1
        return conv(self.channels, 3, stride=2, padding=padding, name="conv", dtype=self.dtype,
                    param_dtype=self.param_dtype)(x_nhwc)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to `size`, matching a skip connection of odd size), then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nhwc: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        height, width = size or (2 * x_nhwc.shape[1], 2 * x_nhwc.shape[2])
        x_nhwc = resize_nearest(x_nhwc, height, width)
        return conv(self.channels, 3, padding=1, name="conv", dtype=self.dtype,
                    param_dtype=self.param_dtype)(x_nhwc)
