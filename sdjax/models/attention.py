"""Multi-head attention with a selectable kernel.

Implementations (the `attention_impl` field of every model):
  "xla"     einsum + float32 softmax; runs everywhere, the numerical reference. On CPU the queries
            go through in blocks (same numbers, bit for bit: each block's softmax still sees every
            key), which halves the time of SD's 4096-token self-attention (see BENCHMARKS.md).
  "dot"     jax.nn.dot_product_attention, letting XLA pick (fused where it can).
  "cudnn"   jax.nn.dot_product_attention(implementation="cudnn"): flash attention on NVIDIA GPUs.
New kernels (e.g. a Pallas flash kernel on TPU) register in ATTENTION_IMPLS.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.layers import Dtype, dense


# Queries per block of the CPU path. Materialising all (B, H, Lq, Lk) logits at once (1 GiB for SD 1.5's
# 4096 tokens at batch 2) makes every call stream fresh memory; blocks of 128 queries keep the buffers
# reused: 0.58 s instead of 1.1 s per call on the 2-core benchmark machine (64 and 256 were slower).
CPU_QUERY_BLOCK = 128


def _xla_attention(q, k, v, *, causal: bool, upcast: bool) -> jax.Array:
    """q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D)."""
    batch, length, heads, depth = q.shape
    block = CPU_QUERY_BLOCK
    if jax.default_backend() == "cpu" and not causal and length > block and length % block == 0:
        # GPU/TPU keep one fused op: a sequential loop over blocks would only slow them down.
        blocks = q.reshape(batch, length // block, block, heads, depth).swapaxes(0, 1)
        out = jax.lax.map(lambda q_block: _full_attention(q_block, k, v, causal=False, upcast=upcast), blocks)
        return out.swapaxes(0, 1).reshape(batch, length, heads, depth)
    return _full_attention(q, k, v, causal=causal, upcast=upcast)


def _full_attention(q, k, v, *, causal: bool, upcast: bool) -> jax.Array:
    scale = q.shape[-1] ** -0.5
    if upcast:  # upcast_attention: logits in float32 (needed by SD2.1-768 in half precision)
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
    logits = logits.astype(jnp.float32)
    if causal:
        lq, lk = logits.shape[-2:]
        mask = jnp.tril(jnp.ones((lq, lk), dtype=bool))
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _fused_attention(implementation: str | None) -> Callable:
    def attend(q, k, v, *, causal: bool, upcast: bool) -> jax.Array:
        dtype = v.dtype
        if upcast:
            q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
        return out.astype(dtype)
    return attend


ATTENTION_IMPLS: dict[str, Callable] = {
    "xla": _xla_attention,
    "dot": _fused_attention(None),
    "cudnn": _fused_attention("cudnn"),
}


def attention_fn(name: str) -> Callable:
    """Returns the attention kernel registered as `name`."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl: unknown {name!r} (known: {', '.join(ATTENTION_IMPLS)})")
    return ATTENTION_IMPLS[name]


def multi_head_attention(q_blc: jax.Array, k_blc: jax.Array, v_blc: jax.Array, heads: int, *,
                         impl: str = "xla", causal: bool = False, upcast: bool = False) -> jax.Array:
    """Projected q (B, Lq, H*D), k/v (B, Lk, H*D) -> attended values (B, Lq, H*D)."""
    split = lambda t: t.reshape(t.shape[:2] + (heads, t.shape[-1] // heads))
    out = attention_fn(impl)(split(q_blc), split(k_blc), split(v_blc), causal=causal, upcast=upcast)
    return out.reshape(out.shape[:2] + (-1,))


class Attention(nn.Module):
    """Self- or cross-attention over token sequences (B, L, C).

    Submodule names follow the checkpoint layout of the owning model
    (diffusers: to_q/to_k/to_v/to_out_0; transformers CLIP: q_proj/k_proj/v_proj/out_proj).
    """

    heads: int
    head_dim: int
    out_features: int
    qkv_bias: bool = False
    names: tuple[str, str, str, str] = ("to_q", "to_k", "to_v", "to_out_0")
    causal: bool = False
    upcast: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_blc: jax.Array, context_blc: jax.Array | None = None) -> jax.Array:
        context_blc = x_blc if context_blc is None else context_blc
        inner = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name=self.names[0], **kw)(x_blc)
        k = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name=self.names[1], **kw)(context_blc)
        v = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name=self.names[2], **kw)(context_blc)
        out = multi_head_attention(q, k, v, self.heads, impl=self.attention_impl, causal=self.causal,
                                   upcast=self.upcast)
        return dense(self.out_features, ("heads", "embed"), name=self.names[3], **kw)(out)
