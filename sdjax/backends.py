"""How JAX is set up before it starts its backends: called first by every command-line tool (train.py,
sample.py, plan.py, the benchmark workers) and by the tests, because XLA reads its flags and JAX picks its
platforms only once, when the first array is made.

Three choices are made here:
- `skip_absent_tpu` (sdjax.tpu_targets): libtpu installed without TPU chips -> JAX stays on the CPU, quietly.
- `choose_cpu_kernels`: which library runs XLA:CPU's convolutions. jax 0.10 hands convolutions, dots and
  reductions to YNNPACK. On CPUs without AVX-512 YNNPACK's convolutions are the slower kernels: on a 2-core
  "AMD EPYC" with AVX2 + FMA only (2026-12-02, BENCHMARKS.md), SD 1.5's UNet forward (64^2 latents, batch 2)
  took 22.2 s with them and 15.0-18.6 s with convolutions left to XLA's own (Eigen) kernels and dots still
  in YNNPACK, against torch's 17.5 s; single 3x3 convolutions at 16x16 and 8x8 ran 2-4x faster. On the
  AVX-512 machine of the 2026-11-22 table YNNPACK's were the faster ones (UNet 1.31x torch), so they stay
  there. A user's own XLA_FLAGS setting of the flag always wins.
- `choose_cpu_scheduler`: XLA:CPU's default scheduler orders a program for concurrency, so work that
  depends on parameters only runs first. Winograd's kernel transforms (sdjax.models.winograd) are such work:
  scheduled at the start, every layer's lived at once, and SD 1.5's UNet forward (64^2 latents, batch 2)
  needed 2.02 GiB of temporaries. With the memory-minimising scheduler it needs 0.18 GiB (0.23 before
  Winograd) and ran faster too, 7.58 s against 7.96 s (2-core AVX-512 "AMD EPYC", 2026-12-05). Set on every
  CPU; again a user's own setting wins.
"""

from __future__ import annotations

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# YNNPACK for dots only (XLA's own default list in later versions): convolutions and reductions go to XLA's
# own kernels.
DOTS_ONLY = "individual_dot"


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them (the first "flags" line of /proc/cpuinfo); empty where
    the file is absent (other systems)."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()


def _add_xla_flag(environ: dict[str, str], flag: str, value: str) -> str | None:
    """Appends flag=value to environ's XLA_FLAGS unless XLA_FLAGS already names the flag (the user's
    setting wins). Returns what was added, or None."""
    current = environ.get("XLA_FLAGS", "")
    if flag in current:
        return None
    added = f"{flag}={value}"
    environ["XLA_FLAGS"] = f"{current} {added}".strip()
    return added


def choose_cpu_kernels(environ: dict[str, str] | None = None, flags: set[str] | None = None) -> str | None:
    """Adds YNN_FLAG=individual_dot to XLA_FLAGS in `environ` (default: os.environ) on an x86 CPU without
    AVX-512 (see the module docstring), unless XLA_FLAGS already sets YNN_FLAG. Returns the flag added, or
    None. Has an effect only before JAX starts its CPU backend."""
    flags = cpu_flags() if flags is None else flags
    if "avx2" not in flags or "avx512f" in flags:
        return None
    return _add_xla_flag(os.environ if environ is None else environ, YNN_FLAG, DOTS_ONLY)


SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def choose_cpu_scheduler(environ: dict[str, str] | None = None) -> str | None:
    """Adds SCHEDULER_FLAG=false (the memory-minimising scheduler; see the module docstring) to XLA_FLAGS in
    `environ` (default: os.environ) unless XLA_FLAGS already sets it. Returns the flag added, or None. Has an
    effect only before JAX starts its CPU backend."""
    return _add_xla_flag(os.environ if environ is None else environ, SCHEDULER_FLAG, "false")


def prepare() -> None:
    """The three choices above; call before anything creates a JAX array."""
    from sdjax.tpu_targets import skip_absent_tpu

    choose_cpu_kernels()
    choose_cpu_scheduler()
    skip_absent_tpu()
