"""The UNet's spatial transformer: self-attention, cross-attention to text, GEGLU feed-forward."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.attention import Attention
from sdjax.models.layers import Dtype, conv, dense, group_norm, layer_norm


class GEGLU(nn.Module):
    inner: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(2 * self.inner, ("embed", "mlp"), name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="geglu", mult=4): net.0 is GEGLU, net.2 the output Linear."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(4 * self.features, name="net_0", **kw)(x)
        return dense(self.features, ("mlp", "embed"), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    heads: int
    head_dim: int
    upcast: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_blc: jax.Array, context_blc: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x_blc.shape[-1]
        attn = dict(upcast=self.upcast, attention_impl=self.attention_impl, **kw)
        h = layer_norm(1e-5, name="norm1", **kw)(x_blc)
        x_blc = x_blc + Attention(self.heads, self.head_dim, dim, name="attn1", **attn)(h)
        h = layer_norm(1e-5, name="norm2", **kw)(x_blc)
        x_blc = x_blc + Attention(self.heads, self.head_dim, dim, name="attn2", **attn)(h, context_blc)
        h = layer_norm(1e-5, name="norm3", **kw)(x_blc)
        return x_blc + FeedForward(dim, name="ff", **kw)(h)


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in (1x1 conv, or Linear for SD2) -> transformer blocks -> proj_out -> + input."""

    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nhwc: jax.Array, context_blc: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, channels = x_nhwc.shape
        inner = self.heads * self.head_dim
        h = group_norm(self.groups, 1e-6, name="norm", **kw)(x_nhwc)
        if self.use_linear_projection:
            h = dense(inner, ("conv_in", "embed"), name="proj_in", **kw)(h.reshape(b, height * width, channels))
        else:
            h = conv(inner, 1, padding=0, name="proj_in", **kw)(h).reshape(b, height * width, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, self.upcast, self.attention_impl,
                                      name=f"transformer_blocks_{i}", **kw)(h, context_blc)
        if self.use_linear_projection:
            h = dense(channels, ("embed", "conv_out"), name="proj_out", **kw)(h).reshape(b, height, width, channels)
        else:
            h = conv(channels, 1, padding=0, name="proj_out", **kw)(h.reshape(b, height, width, inner))
        return h + x_nhwc
