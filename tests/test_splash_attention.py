"""The Pallas splash attention path ("splash"; "auto" on TPU) against the one-op form.

On CPU the kernel runs in Pallas interpret mode: the same kernel program, so its numbers (padding, masking of
padded keys, scaling, the custom backward) are checked here at up to ~1k tokens. The TPU compiles of SD's
full shapes are in test_splash_tpu.py (they need libtpu).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models.attention import _full_attention, attention_fn, multi_head_attention, resolved_impl
from sdjax.models.splash_attention import splash_attention

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(batch, q_len, kv_len, heads, depth, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, q_len, heads, depth), jnp.float32)
    k = jax.random.normal(keys[1], (batch, kv_len, heads, depth), jnp.float32)
    v = jax.random.normal(keys[2], (batch, kv_len, heads, depth), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _attend(kernel, causal=False, upcast=False):
    return jax.jit(lambda q, k, v: kernel(q, k, v, causal=causal, upcast=upcast))


# (batch, queries, keys, heads, head dim, causal): SD 1.x head dims 40/80/160, SD 2.x's 64; cross-attention
# to CLIP's 77 tokens (keys padded to 128 and masked); lengths that are not whole 128-row blocks (the 8x8
# level's 64 pixels, 12x12 = 144); CLIP's causal 77-token self-attention; 1024-token self-attention.
CASES = [
    (2, 1024, 1024, 2, 40, False),
    (2, 256, 77, 2, 80, False),
    (1, 64, 64, 2, 160, False),
    (2, 144, 144, 3, 64, False),
    (2, 77, 77, 2, 64, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-q{}-k{}-h{}-d{}{}".format(*c[:5], "-causal" * c[5]))
def test_forward_matches_one_op_form_float32(case):
    batch, q_len, kv_len, heads, depth, causal = case
    q, k, v = _qkv(batch, q_len, kv_len, heads, depth, jnp.float32)
    out = _attend(splash_attention, causal)(q, k, v)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert _relative(out, _attend(_full_attention, causal)(q, k, v)) <= 1e-5


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=["cross77", "self144", "causal77"])
def test_gradients_match_one_op_form_float32(case):
    batch, q_len, kv_len, heads, depth, causal = case
    q, k, v = _qkv(batch, q_len, kv_len, heads, depth, jnp.float32)
    cotangent = jax.random.normal(jax.random.key(9), q.shape)

    def grads(kernel):
        loss = lambda q, k, v: (kernel(q, k, v, causal=causal, upcast=False) * cotangent).sum()
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads(splash_attention), grads(_full_attention)):
        assert _relative(got, want) <= 1e-5


def test_bfloat16_within_the_one_op_forms_bound():
    """In bfloat16 the kernel is as close to the float32 answer as the one-op form in bfloat16 is."""
    q, k, v = _qkv(2, 256, 77, 2, 40, jnp.bfloat16)
    exact = _attend(_full_attention)(*(t.astype(jnp.float32) for t in (q, k, v)))
    splash = _attend(splash_attention)(q, k, v)
    assert splash.dtype == jnp.bfloat16
    bound = _relative(_attend(_full_attention)(q, k, v).astype(jnp.float32), exact)
    assert 0 < _relative(splash.astype(jnp.float32), exact) <= 2 * bound


def test_upcast_runs_in_float32():
    q, k, v = _qkv(1, 128, 77, 2, 64, jnp.bfloat16)
    out = _attend(splash_attention, upcast=True)(q, k, v)
    exact = _attend(_full_attention)(*(t.astype(jnp.float32) for t in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    assert _relative(out.astype(jnp.float32), exact) <= 2**-8  # only the output's rounding to bfloat16


def test_auto_is_the_xla_form_off_tpu():
    assert resolved_impl("auto") == "xla" and resolved_impl("splash") == "splash"
    q, k, v = _qkv(1, 256, 77, 2, 40, jnp.float32)
    np.testing.assert_array_equal(_attend(attention_fn("auto"))(q, k, v), _attend(attention_fn("xla"))(q, k, v))
    with pytest.raises(ValueError, match="attention_impl: unknown 'flash'.*splash.*auto"):
        resolved_impl("flash")


def test_heads_are_split_and_joined_like_the_other_kernels():
    q, k, v = (t.reshape(t.shape[:2] + (-1,)) for t in _qkv(2, 128, 77, 4, 40, jnp.float32))
    run = lambda impl: jax.jit(lambda q, k, v: multi_head_attention(q, k, v, 4, impl=impl))(q, k, v)
    assert _relative(run("splash"), run("xla")) <= 1e-5


SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from sdjax.parallel import DEFAULT_RULES, activate, make_mesh, mesh_config
from sdjax.hlo_collectives import collectives
from sdjax.models.attention import attention_fn

cfg = mesh_config(); cfg.data, cfg.fsdp, cfg.tensor = 2, 2, 2
mesh = make_mesh(cfg)
keys = jax.random.split(jax.random.key(0), 3)
shapes = [(8, 256, 4, 40), (8, 77, 4, 40), (8, 77, 4, 40)]
q, k, v = (jax.random.normal(key, s) for key, s in zip(keys, shapes))
spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
out, found = {}, {}
for impl in ("xla", "splash"):
    fn = jax.jit(lambda q, k, v: attention_fn(impl)(q, k, v, causal=False, upcast=False), out_shardings=spec)
    with activate(mesh, DEFAULT_RULES):
        compiled = fn.lower(*(jax.device_put(t, spec) for t in (q, k, v))).compile()
        out[impl] = np.asarray(compiled(*(jax.device_put(t, spec) for t in (q, k, v))))
    found[impl] = {kind: c["count"] for kind, c in collectives(compiled.as_text()).items()}
err = float(np.abs(out["splash"] - out["xla"]).max() / np.abs(out["xla"]).max())
print(json.dumps({"collectives": found, "relative_error": err}))
"""


def test_under_a_mesh_each_device_attends_its_own_batch_and_heads():
    """data=2 x fsdp=2 x tensor=2 on 8 CPU devices: the kernel runs in shard_map over batch and heads, so its
    program has the one-op form's collectives (none), not an all-gather of q, k and v onto every device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["relative_error"] <= 1e-5
    assert report["collectives"]["splash"] == report["collectives"]["xla"]
    assert sum(report["collectives"]["splash"].values()) == 0
