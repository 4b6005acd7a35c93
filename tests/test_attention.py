"""The CPU path of the "xla" attention (head by head, queries in blocks, own backward) against the single
fused computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models import attention
from sdjax.models.layers import single_cpu_device

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)


def _blocked(q, k, v, block):
    """The blocked kernel on (B, L, H, D) inputs, called directly so it is tested on any backend."""
    batch, length, heads, depth = q.shape
    heads_major = lambda t: t.swapaxes(1, 2).reshape(batch * heads, -1, depth)
    out = attention._blocked_attention(heads_major(q) * depth**-0.5, heads_major(k), heads_major(v), block)
    return out.reshape(batch, heads, length, depth).swapaxes(1, 2)


def _full(q, k, v):
    return attention._full_attention(q, k, v, causal=False, upcast=False)


@pytest.mark.parametrize("length, keys, block", [(256, 256, 64), (192, 40, 192), (192, 40, 16)])
def test_blocked_attention_matches_full_attention_and_its_gradients(length, keys, block):
    q, v_out = jax.random.normal(jax.random.key(0), (2, 2, length, 4, 8))
    k, v = jax.random.normal(jax.random.key(1), (2, 2, keys, 4, 8))

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * v_out).sum()

    blocked = _blocked(q, k, v, block)
    assert blocked.shape == (2, length, 4, 8)
    # Each block's softmax sees every key, so the numbers agree up to summation order.
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(_full(q, k, v)), rtol=0, atol=2e-6)
    grads = jax.grad(loss(lambda q, k, v: _blocked(q, k, v, block)), argnums=(0, 1, 2))(q, k, v)
    reference = jax.grad(loss(_full), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", grads, reference):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5, err_msg=f"d{name}")


@pytest.mark.skipif(not single_cpu_device(), reason="the path of one CPU device")
def test_xla_attention_takes_the_blocked_path_in_float32_for_half_inputs(monkeypatch):
    monkeypatch.setattr(attention, "CPU_BLOCK_LOGITS", 64 * 256)
    monkeypatch.setattr(attention, "CPU_BLOCKED_MIN_LOGITS", 1)
    q, k, v = jax.random.normal(jax.random.key(2), (3, 2, 256, 4, 40))
    calls = []
    monkeypatch.setattr(attention, "_blocked_attention",
                        lambda *a: calls.append(a[-1]) or attention._blocked_forward(*a)[0])
    half = attention._xla_attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)), causal=False, upcast=False)
    assert calls == [64] and half.dtype == jnp.bfloat16
    # Computed in float32 from the rounded inputs: as close as the upcast one-op form, unlike bf16 logits.
    rounded = [t.astype(jnp.bfloat16).astype(jnp.float32) for t in (q, k, v)]
    error = float(jnp.abs(half.astype(jnp.float32) - _full(*rounded)).max())
    upcast = attention._full_attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)), causal=False, upcast=True)
    assert error <= float(jnp.abs(upcast.astype(jnp.float32) - _full(*rounded)).max()) + 1e-3
    attention._xla_attention(q, k, v, causal=True, upcast=False)
    assert calls == [64]  # causal: the one-op form with its mask


def test_query_block_is_the_largest_divisor_within_the_logits_budget():
    assert attention._query_block(4096, 4096) == 512  # SD 1.5's 64x64 self-attention: 8 MiB of logits
    assert attention._query_block(1024, 1024) == 1024
    assert attention._query_block(4099, 4096) is None  # a prime: no block of >= 16 queries divides it
    assert attention._cpu_query_block(4096, 77, causal=False) is None  # cross-attention: small logits
    assert attention._cpu_query_block(4096, 4096, causal=True) is None


@pytest.mark.skipif(not single_cpu_device(), reason="the blocked path loops on one CPU device only")
def test_traced_flops_counts_the_blocked_attention_that_compiled_counts_leave_out():
    from sdjax.flops import compiled_flops, counts_short, traced_flops

    args = (jax.ShapeDtypeStruct((2, 1024, 16), jnp.float32),) * 3
    forward = lambda impl: lambda q, k, v: attention.multi_head_attention(q, k, v, 2, impl=impl)
    gradient = lambda impl: jax.grad(lambda *a: forward(impl)(*a).sum(), argnums=(0, 1, 2))
    for fn in (forward, gradient):
        # The train loop re-counts exactly the programs in which the blocked loop survived compilation.
        assert counts_short(jax.jit(fn("xla")).lower(*args).compile())
        assert not counts_short(jax.jit(fn("dot")).lower(*args).compile())
        short = (jax.ShapeDtypeStruct((2, 64, 16), jnp.float32),) * 3
        assert not counts_short(jax.jit(fn("xla")).lower(*short).compile())
        looped = compiled_flops(jax.jit(fn("xla")).lower(*args))
        one_op = compiled_flops(jax.jit(fn("dot")).lower(*args))
        # 2 x 2 heads x 1024 x 1024 logits x 8 features x 2 (multiply-add) x 2 matmuls: 134 MFLOP forward.
        assert one_op >= 2 * 2 * 1024 * 1024 * 8 * 2 * 2 and looped < 0.5 * one_op
        assert traced_flops(fn("xla"), *args) == pytest.approx(one_op, rel=0.05)
        assert traced_flops(fn("cudnn"), *args) == pytest.approx(one_op, rel=0.05)  # traced, never run
    # One jitted function traced for running, then counted, then traced for running again, all as
    # traced_flops traces (CPU default device): no trace is shared between the two forms either way.
    jitted = jax.jit(forward("xla"))
    with jax.default_device(jax.devices("cpu")[0]):
        looped = compiled_flops(jitted.lower(*args))
        assert traced_flops(jitted, *args) > 2 * looped
        assert compiled_flops(jitted.lower(*args)) == looped


def test_upcast_casts_for_dot_but_not_for_cudnn_which_takes_half_precision_only(monkeypatch):
    seen = []
    monkeypatch.setattr(attention.jax.nn, "dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.dtype, kw["implementation"])) or q)
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    for name in ("dot", "cudnn"):
        assert attention.ATTENTION_IMPLS[name](q, q, q, causal=False, upcast=True).dtype == jnp.bfloat16
    assert seen == [(jnp.float32, None), (jnp.bfloat16, "cudnn")]
