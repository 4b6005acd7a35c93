"""The CPU path of the "xla" attention (head by head, queries in blocks, own backward) against the single
fused computation."""

import jax
import numpy as np
import pytest

from sdjax.models import attention


@pytest.fixture
def small_blocks(monkeypatch):
    # The real thresholds only trigger at SD-sized sequences; shrink them so tiny inputs take the blocked path.
    monkeypatch.setattr(attention, "CPU_BLOCK_LOGITS", 64 * 256)
    monkeypatch.setattr(attention, "CPU_BLOCKED_MIN_LOGITS", 1)


@pytest.mark.parametrize("length, keys, block", [(256, 256, 64), (192, 40, 192), (97, 256, None)])
def test_blocked_attention_matches_full_attention_and_its_gradients(small_blocks, length, keys, block):
    q, v_out = jax.random.normal(jax.random.key(0), (2, 2, length, 4, 8))
    k, v = jax.random.normal(jax.random.key(1), (2, 2, keys, 4, 8))
    assert attention._query_block(length, keys) == block  # None: no divisor of 97 fits; the one-op path

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, causal=False, upcast=False) * v_out).sum()

    blocked = attention._xla_attention(q, k, v, causal=False, upcast=False)
    full = attention._full_attention(q, k, v, causal=False, upcast=False)
    assert blocked.shape == (2, length, 4, 8)
    # Each block's softmax sees every key, so the numbers agree up to summation order.
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), rtol=0, atol=2e-6)
    grads = jax.grad(loss(attention._xla_attention), argnums=(0, 1, 2))(q, k, v)
    reference = jax.grad(loss(attention._full_attention), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", grads, reference):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5, err_msg=f"d{name}")


def test_query_block_is_the_largest_divisor_within_the_logits_budget():
    assert attention._query_block(4096, 4096) == 512  # SD 1.5's 64x64 self-attention: 8 MiB of logits
    assert attention._query_block(1024, 1024) == 1024
    assert attention._query_block(4099, 4096) is None  # a prime: no block of >= 16 queries divides it
