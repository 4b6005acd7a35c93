"""Multi-head attention with a selectable kernel.

Implementations (the `attention_impl` field of every model):
  "xla"     einsum + float32 softmax; runs everywhere, the numerical reference. On CPU long
            sequences go head by head in blocks of queries, in float32, with a flash-style backward
            (each block's softmax still sees every key, so the numbers agree to float rounding);
            3x faster on SD's 4096-token self-attention (see BENCHMARKS.md).
  "dot"     jax.nn.dot_product_attention, letting XLA pick (fused where it can).
  "cudnn"   jax.nn.dot_product_attention(implementation="cudnn"): flash attention on NVIDIA GPUs.
  "splash"  jax's Pallas splash (flash) kernel on TPU, with SD's shapes padded to its blocks and shard_map
            under a mesh (sdjax.models.splash_attention); elsewhere the same kernel in interpret mode (slow).
  "auto"    "splash" in programs for TPU, "xla" everywhere else: the default of sample.py and train.py.
New kernels register in ATTENTION_IMPLS.
Programs traced only to count their FLOPs trace every kernel as plain einsums (`layers.counting_flops`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.layers import Dtype, counting, dense, single_cpu_device
from sdjax.models.splash_attention import on_tpu, splash_attention


# The CPU path works one head and one block of queries at a time, so the float32 logits of a block
# (block x keys) stay near 8 MiB and are reused from cache instead of streamed from memory: SD 1.5's
# 4096-token self-attention (batch 2, 8 heads of 40) went 1.1 s -> 0.58 s with all heads in blocks of
# 128 queries, and to ~0.33 s like this (torch's fused SDPA: 0.34 s; see BENCHMARKS.md).
CPU_BLOCK_LOGITS = 2**21
# Below this many logits per head one fused op is as fast: no loop.
CPU_BLOCKED_MIN_LOGITS = 2**20


BLOCKED_SCOPE = "cpu_blocked_attention"


def _xla_attention(q, k, v, *, causal: bool, upcast: bool) -> jax.Array:
    """q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D)."""
    (batch, length, heads, depth), keys = q.shape, k.shape[1]
    block = _cpu_query_block(length, keys, causal)
    if block:
        # Always float32 here, as if upcast: the scale is applied after the cast, like the upcast form.
        heads_major = lambda t: t.astype(jnp.float32).swapaxes(1, 2).reshape(batch * heads, -1, depth)
        with jax.named_scope(BLOCKED_SCOPE):  # found by name in compiled programs (flops.counts_short)
            out = _blocked_attention(heads_major(q) * depth**-0.5, heads_major(k), heads_major(v), block)
        return out.reshape(batch, heads, length, depth).swapaxes(1, 2).astype(v.dtype)
    return _full_attention(q, k, v, causal=causal, upcast=upcast)


def _cpu_query_block(length: int, keys: int, causal: bool) -> int | None:
    """Queries per block of the blocked path, or None where one fused op is the better program: on
    GPU/TPU (a sequential loop would only slow them down), for causal or short sequences, and with
    more than one device (the loop runs over batch x heads, so a sharded batch would be gathered onto
    every device and its attention computed there in full)."""
    if not single_cpu_device() or causal or length * keys < CPU_BLOCKED_MIN_LOGITS:
        return None
    return _query_block(length, keys)


def _query_block(length: int, keys: int) -> int | None:
    """The largest divisor of `length` of at least 16 whose logits (block x keys) fit
    CPU_BLOCK_LOGITS, or None."""
    fits = [b for b in range(16, length + 1) if length % b == 0 and b * keys <= CPU_BLOCK_LOGITS]
    return max(fits, default=None)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_attention(q, k, v, block: int) -> jax.Array:
    """Softmax attention of float32 q (N, Lq, D) (already scaled), k/v (N, Lk, D), head by head and
    `block` queries at a time; every block's softmax sees all keys, so only summation order differs
    from the one-op form."""
    return _blocked_forward(q, k, v, block)[0]


def _blocked_forward(q, k, v, block):
    def head(qkv):
        q_head, k_head, v_head = qkv

        def one_block(q_block):
            logits = q_block @ k_head.T
            peak = logits.max(-1, keepdims=True)
            weights = jnp.exp(logits - peak)
            total = weights.sum(-1, keepdims=True)
            # Normalising the (block, D) output instead of the (block, Lk) weights: one pass fewer.
            return (weights @ v_head) / total, (peak + jnp.log(total))[:, 0]

        out, logsumexp = jax.lax.map(one_block, q_head.reshape(-1, block, q.shape[-1]))
        return out.reshape(q_head.shape), logsumexp.reshape(-1)

    out, logsumexp = jax.lax.map(head, (q, k, v))
    return out, (q, k, v, out, logsumexp)


def _blocked_backward(block, residuals, d_out):
    # Flash-attention backward: the weights of each block are recomputed from the saved log-sum-exp,
    # so training never holds (Lq, Lk) per head either.
    q, k, v, out, logsumexp = residuals
    d_logits_offset = (d_out * out).sum(-1)  # (N, Lq): rowsum(dP * P) = rowsum(dO * O)

    def head(args):
        q_head, k_head, v_head, d_out_head, lse_head, offset_head = args
        split = lambda t: t.reshape((-1, block) + t.shape[1:])

        def one_block(carry, xs):
            d_k, d_v = carry
            q_block, d_out_block, lse_block, offset_block = xs
            weights = jnp.exp(q_block @ k_head.T - lse_block[:, None])
            d_weights = d_out_block @ v_head.T
            d_logits = weights * (d_weights - offset_block[:, None])
            carry = (d_k + d_logits.T @ q_block, d_v + weights.T @ d_out_block)
            return carry, d_logits @ k_head

        zeros = (jnp.zeros_like(k_head), jnp.zeros_like(v_head))
        (d_k, d_v), d_q = jax.lax.scan(
            one_block, zeros, (split(q_head), split(d_out_head), split(lse_head), split(offset_head)))
        return d_q.reshape(q_head.shape), d_k, d_v

    return jax.lax.map(head, (q, k, v, d_out, logsumexp, d_logits_offset))


_blocked_attention.defvjp(_blocked_forward, _blocked_backward)


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
        # cuDNN takes half precision only, and its kernel keeps the logits and softmax in float32 anyway.
        if upcast and implementation != "cudnn":
            q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
        return out.astype(dtype)
    return attend


def _auto_attention(q, k, v, *, causal: bool, upcast: bool) -> jax.Array:
    return (splash_attention if on_tpu() else _xla_attention)(q, k, v, causal=causal, upcast=upcast)


ATTENTION_IMPLS: dict[str, Callable] = {
    "xla": _xla_attention,
    "dot": _fused_attention(None),
    "cudnn": _fused_attention("cudnn"),
    "splash": splash_attention,
    "auto": _auto_attention,
}


def attention_fn(name: str) -> Callable:
    """Returns the attention kernel registered as `name`."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl: unknown {name!r} (known: {', '.join(ATTENTION_IMPLS)})")
    return ATTENTION_IMPLS[name]


def resolved_impl(name: str) -> str:
    """The kernel `name` stands for on this process's platform ("auto" -> "splash" or "xla"), for records
    that must tell the numbers' source apart (e.g. the latent cache's key)."""
    attention_fn(name)
    return ("splash" if on_tpu() else "xla") if name == "auto" else name


def multi_head_attention(q_blc: jax.Array, k_blc: jax.Array, v_blc: jax.Array, heads: int, *,
                         impl: str = "xla", causal: bool = False, upcast: bool = False) -> jax.Array:
    """Projected q (B, Lq, H*D), k/v (B, Lk, H*D) -> attended values (B, Lq, H*D)."""
    split = lambda t: t.reshape(t.shape[:2] + (heads, t.shape[-1] // heads))
    kernel = attention_fn(impl)  # also when counting: an unknown name fails either way
    if counting():
        kernel = _full_attention
    out = kernel(split(q_blc), split(k_blc), split(v_blc), causal=causal, upcast=upcast)
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
