"""The splash kernel compiled by libtpu's TPU compiler (no TPU needed) at Stable Diffusion's full shapes: head
dims 40/80/160/64, self-attention up to 16384 tokens, cross-attention to 77 keys, CLIP's causal 77 tokens,
forward and backward, bfloat16 and float32. Each program must hold the kernel as a TPU custom call and never
the (queries x keys) logits; under a v5e-8 mesh it must need the same collectives as the one-op form.
One process compiles everything (libtpu is set up before JAX loads it, as plan.py does): ~1-2 minutes here."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="libtpu (the TPU compiler) is not installed: pip install 'sdjax[tpu]'")

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, batch, queries, keys, heads, head dim, causal)
SHAPES = [
    ("sd15-512-self", 2, 4096, 4096, 8, 40, False),
    ("sd15-512-cross", 2, 4096, 77, 8, 40, False),
    ("sd15-512-level2", 2, 1024, 1024, 8, 80, False),
    ("sd15-512-level3-cross", 2, 256, 77, 8, 160, False),
    ("sdxl-1024-self", 2, 4096, 4096, 10, 64, False),
    ("sd15-1024-self", 1, 16384, 16384, 8, 40, False),
    ("clip-causal", 2, 77, 77, 12, 64, True),
]

SCRIPT = r"""
import json, sys
from sdjax import tpu_targets
target = tpu_targets.parse_target("v5e-8")
tpu_targets.quiet_libtpu(target)
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sdjax.hlo_collectives import collectives, custom_calls
from sdjax.models.attention import attention_fn
from sdjax.parallel import DEFAULT_RULES, activate, make_mesh, mesh_config

devices = tpu_targets.topology_devices(target)
shapes = json.loads(sys.argv[1])

def compile_on(mesh, spec, impl, shape, dtype, grad):
    _, batch, q_len, kv_len, heads, depth, causal = shape
    attend = lambda q, k, v: attention_fn(impl)(q, k, v, causal=causal, upcast=False)
    fn = attend
    if grad:
        fn = jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    args = [jax.ShapeDtypeStruct((batch, n, heads, depth), dtype, sharding=NamedSharding(mesh, spec))
            for n in (q_len, kv_len, kv_len)]
    with activate(mesh, DEFAULT_RULES):
        compiled = jax.jit(fn).lower(*args).compile()
    text = compiled.as_text()
    return {"kernels": custom_calls(text).get("tpu_custom_call", 0),
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
            "collectives": {k: c["count"] for k, c in collectives(text).items()}}

one_chip = Mesh(np.asarray(devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
out = {"one_chip": {}, "mesh": {}}
for shape in shapes:
    for dtype in (jnp.bfloat16, jnp.float32):
        for grad in (False, True):
            key = f"{shape[0]}/{jnp.dtype(dtype).name}/{'grad' if grad else 'forward'}"
            out["one_chip"][key] = compile_on(one_chip, P(), "splash", shape, dtype, grad)
cfg = mesh_config(); cfg.data, cfg.fsdp, cfg.tensor = 2, 2, 2
mesh = make_mesh(cfg, devices)
spec = P(("data", "fsdp"), None, "tensor", None)
for impl in ("xla", "splash"):
    out["mesh"][impl] = compile_on(mesh, spec, impl, ["sd15-512-cross", 8, 4096, 77, 8, 40, False], jnp.bfloat16, True)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(SHAPES)], capture_output=True, text=True,
                            cwd=ROOT, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_sd_shapes_compile_to_the_tpu_kernel_without_materialised_logits(compiled, shape):
    name, batch, q_len, kv_len, heads, _, _ = shape
    for dtype in ("bfloat16", "float32"):
        forward, grad = (compiled["one_chip"][f"{name}/{dtype}/{kind}"] for kind in ("forward", "grad"))
        assert forward["kernels"] >= 1 and grad["kernels"] >= 3  # forward; forward + dq + dk/dv
        # float32 logits of one example and head would be 4 x q_len x kv_len bytes (1 GiB at 16384 tokens);
        # the kernel keeps only blocks of them.
        logits = 4 * q_len * kv_len * heads * batch
        if logits >= 2**28:
            assert grad["temp_bytes"] < logits / 4, (name, dtype, grad["temp_bytes"])


def test_under_a_v5e_8_mesh_the_kernel_adds_no_collectives(compiled):
    """Batch over data x fsdp and heads over tensor: each chip attends its own examples and heads, as the
    one-op form does, instead of XLA gathering q, k and v around an opaque custom call."""
    splash, one_op = compiled["mesh"]["splash"], compiled["mesh"]["xla"]
    assert splash["kernels"] >= 3 and one_op["kernels"] == 0
    assert splash["collectives"] == one_op["collectives"]
