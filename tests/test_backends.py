"""sdjax.backends: the XLA:CPU kernel choice made before JAX starts (no torch needed)."""

import os
import subprocess
import sys
import textwrap

import pytest

from sdjax.backends import DOTS_ONLY, SCHEDULER_FLAG, YNN_FLAG, choose_cpu_kernels, choose_cpu_scheduler, cpu_flags

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)

AVX2 = {"sse2", "avx", "avx2", "fma"}


def test_convolutions_leave_ynnpack_only_without_avx512():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert choose_cpu_kernels(env, AVX2) == f"{YNN_FLAG}={DOTS_ONLY}"
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {YNN_FLAG}={DOTS_ONLY}"
    for flags in (AVX2 | {"avx512f"}, {"neon", "asimd"}, set()):  # AVX-512, Arm, unknown: XLA's default
        env = {}
        assert choose_cpu_kernels(env, flags) is None and "XLA_FLAGS" not in env


def test_the_users_own_setting_wins():
    env = {"XLA_FLAGS": f"{YNN_FLAG}=individual_dot,individual_convolution"}
    assert choose_cpu_kernels(env, AVX2) is None
    assert env["XLA_FLAGS"] == f"{YNN_FLAG}=individual_dot,individual_convolution"


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t: x\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "fma"}
    assert cpu_flags(str(tmp_path / "absent")) == set()


def test_the_flag_takes_convolutions_out_of_ynnpack():
    """The flag is XLA's (an unknown one would abort every JAX start): with it, a 3x3 convolution big enough
    for YNNPACK compiles to XLA's own convolution; without it, to a YNNPACK fusion."""
    program = textwrap.dedent("""
        import jax, jax.numpy as jnp
        x, k = jnp.ones((2, 16, 16, 256)), jnp.ones((3, 3, 256, 256))
        conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
        text = jax.jit(conv).lower(x, k).compile().as_text()
        print("ynn" if "ynn" in text else "xla")
    """)

    def kernel(xla_flags: str) -> str:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}
        out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
        return out.stdout.split()[-1]

    assert kernel(f"{YNN_FLAG}={DOTS_ONLY}") == "xla"
    assert kernel(f"{YNN_FLAG}=individual_convolution") == "ynn"


def test_the_memory_minimising_scheduler_is_chosen_unless_the_user_chose():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert choose_cpu_scheduler(env) == f"{SCHEDULER_FLAG}=false"
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {SCHEDULER_FLAG}=false"
    env = {"XLA_FLAGS": f"{SCHEDULER_FLAG}=true"}
    assert choose_cpu_scheduler(env) is None and env["XLA_FLAGS"] == f"{SCHEDULER_FLAG}=true"


def test_the_scheduler_flag_keeps_parameter_only_work_from_piling_up():
    """The flag is XLA's (an unknown one would abort every JAX start). A chain of layers, each multiplying
    by a transform of its own weights: scheduled for concurrency, every transform is made first and all
    are alive at once; with the flag, one at a time."""
    program = textwrap.dedent("""
        import jax, jax.numpy as jnp
        ws = [jnp.ones((512, 512)) for _ in range(8)]
        def chain(x, ws):
            for w in ws:
                x = jnp.tanh(x @ (w * 2.0 + 1.0))
            return x
        compiled = jax.jit(chain).lower(jnp.ones((4, 512)), ws).compile()
        print(compiled.memory_analysis().temp_size_in_bytes)
    """)

    def temporaries(xla_flags: str) -> int:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}
        out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    one_transform = 512 * 512 * 4
    assert temporaries(f"{SCHEDULER_FLAG}=false") < 3 * one_transform
    assert temporaries(f"{SCHEDULER_FLAG}=true") >= 6 * one_transform
