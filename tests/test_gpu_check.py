"""benchmarks.gpu_check on a machine without a GPU: the checks run with the CPU standing in (so the script
works when a GPU machine runs it), a wrong kernel fails them, and no GPU is one line and exit 2."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu_check
from sdjax.models import attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ((1, 256, 256, 2, 40), (1, 128, 77, 2, 64))


def test_checks_pass_on_the_cpu_standing_in_for_the_gpu():
    cpu = jax.devices("cpu")[0]
    checks = gpu_check.sampling_checks(cpu, cpu, steps=2) + gpu_check.attention_checks(cpu, "xla", shapes=SMALL)
    assert [c.passed for c in checks] == [True] * 4, checks
    assert "max pixel difference 0.00e+00" in checks[0].detail  # the same program on the same device


def test_a_wrong_attention_kernel_fails(monkeypatch):
    exact = attention.ATTENTION_IMPLS["dot"]
    monkeypatch.setitem(attention.ATTENTION_IMPLS, "off_by_a_bit",
                        lambda q, k, v, **kw: exact(q, k, v, **kw) * jnp.asarray(1.02, q.dtype))
    cpu = jax.devices("cpu")[0]
    checks = gpu_check.attention_checks(cpu, "off_by_a_bit", shapes=SMALL[:1])
    assert checks[0].passed is False and "max error" in checks[0].detail


def test_no_gpu_is_one_line_and_exit_2():
    if any(d.platform == "gpu" for d in jax.devices()):  # pragma: no cover - CI has no GPU
        pytest.skip("a GPU is visible: the check would run")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("benchmarks.gpu_check: error: JAX sees no GPU"), lines
