"""The CPU path of the "xla" attention (queries in blocks) against the single fused computation."""

import jax
import numpy as np
import pytest

from sdjax.models import attention


@pytest.mark.parametrize("length", [attention.CPU_QUERY_BLOCK * 4, attention.CPU_QUERY_BLOCK * 2 + 1])
def test_blocked_queries_match_full_attention(length):
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, length, 4, 8))
    k = k[:, : length // 2 + 3]  # cross-attention shape: fewer keys than queries
    v = v[:, : length // 2 + 3]
    blocked = attention._xla_attention(q, k, v, causal=False, upcast=False)
    full = attention._full_attention(q, k, v, causal=False, upcast=False)
    assert blocked.shape == (2, length, 4, 8)
    # Each block's softmax sees every key, so the numbers agree up to the matmul's summation order.
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), rtol=0, atol=1e-6)
