"""The TPU attention kernel: jax's Pallas splash attention (flash attention with block-sparse masks), fitted to
Stable Diffusion's shapes.

jax.experimental.pallas.ops.tpu.splash_attention is jax's own maintained TPU kernel (maxtext's default), so
it is used as is; this file only adapts SD's attention to it:
  - sequences are padded to whole 128-row blocks (cross-attention's 77 text tokens, the 8x8 level's 64
    pixels, odd resolutions), and padded keys are masked out by segment ids, so they get no weight;
  - any head dim compiles as it is (SD 1.x: 40/80/160, SD 2.x / SDXL: 64): the kernel's blocks take the
    whole head dim;
  - the kernel works on one example's (heads, length, depth) and is vmapped over the batch;
  - a Pallas call is opaque to XLA's sharding partitioner, which would gather its inputs onto every
    device; under a mesh it runs in shard_map over the mesh axes that the logical rules give "batch" and
    "heads", so each device attends its own examples and heads and no collective is added.
On TPU the kernel compiles with Mosaic into one custom call per direction; on any other platform the same
kernel runs in Pallas interpret mode (slow, for checking numerics on CPU).
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.parallel import spec_for

LANES = 128  # the kernel's block granularity along both sequences
_BLOCKS = (512, 256, 128)  # preferred block sizes, largest first (each must divide the padded length)

_log = logging.getLogger(__name__)
_warned_interpret = False


def _padded(length: int) -> int:
    return -(-length // LANES) * LANES


def _block(length: int) -> int:
    return next(b for b in _BLOCKS if length % b == 0)


def _kernel(heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool):
    """splash's multi-head kernel for one example: (heads, q_len, D) x (heads, kv_len, D) -> (heads, q_len, D)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (q_len, kv_len)
    mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    bq, bkv = _block(q_len), _block(kv_len)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                               block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), head_shards=1, q_seq_shards=1,
                                  block_sizes=blocks, interpret=interpret)


def _attend_local(q, k, v, *, lengths: tuple[int, int], causal: bool, interpret: bool) -> jax.Array:
    """Padded, scaled q (B, H, Lq', D) and k/v (B, H, Lk', D) of one device -> (B, H, Lq', D)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    heads, q_len, kv_len = q.shape[1], q.shape[2], k.shape[2]
    kernel = _kernel(heads, q_len, kv_len, causal, interpret)
    # Segment ids: queries are all segment 0, padded keys segment 1, so no query attends a padded key.
    # (Padded queries attend the real keys and are sliced off afterwards.)
    segments = splash.SegmentIds(q=jnp.zeros((q_len,), jnp.int32),
                                 kv=(jnp.arange(kv_len) >= lengths[1]).astype(jnp.int32))
    return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segments)


def _mesh_spec(shape: tuple[int, ...]) -> tuple[Any, jax.sharding.PartitionSpec] | None:
    """The context mesh and the spec of a (B, H, L, D) operand: batch and heads split as the logical rules say
    (sdjax.parallel.spec_for, as for every activation), the rest whole; None without a mesh of >1 device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    return mesh, spec_for(("batch", "heads", None, None), shape, mesh, nn.get_logical_axis_rules())


def _run(q, k, v, *, lengths: tuple[int, int], causal: bool, interpret: bool) -> jax.Array:
    attend = lambda q, k, v: _attend_local(q, k, v, lengths=lengths, causal=causal, interpret=interpret)
    placed = _mesh_spec(q.shape)
    if placed is None:
        return attend(q, k, v)
    mesh, spec = placed
    kv_spec = jax.sharding.PartitionSpec(*spec[:2], None, None)
    return jax.shard_map(attend, mesh=mesh, in_specs=(spec, kv_spec, kv_spec), out_specs=spec, check_vma=False)(q, k, v)


def _on_tpu(mesh: Any) -> bool:
    platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
    return platform == "tpu"


def on_tpu() -> bool:
    """Whether the program being traced runs on TPU: the context mesh's platform, else JAX's default backend."""
    return _on_tpu(jax.sharding.get_abstract_mesh())


def splash_attention(q, k, v, *, causal: bool, upcast: bool) -> jax.Array:
    """q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D), with jax's Pallas splash kernel (interpret mode
    off TPU). The kernel keeps logits and softmax in float32 whatever the input dtype; `upcast` also makes
    q, k and v float32 on the way in, as the one-op form does."""
    global _warned_interpret
    dtype, depth = v.dtype, q.shape[-1]
    if upcast:
        q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    q = q * jnp.asarray(depth**-0.5, q.dtype)  # the kernel does not scale; same rounding as the one-op form
    lengths = (q.shape[1], k.shape[1])
    pad = lambda t, n: jnp.pad(t.swapaxes(1, 2), ((0, 0), (0, 0), (0, _padded(n) - n), (0, 0)))
    interpret = not on_tpu()
    if interpret and not _warned_interpret:
        _warned_interpret = True
        _log.warning("attention 'splash' off TPU: the Pallas kernel runs in interpret mode (slow; for checking numerics)")
    out = _run(pad(q, lengths[0]), pad(k, lengths[1]), pad(v, lengths[1]), lengths=lengths, causal=causal,
               interpret=interpret)
    return out[:, :, :lengths[0]].swapaxes(1, 2).astype(dtype)


__all__ = ["LANES", "on_tpu", "splash_attention"]
