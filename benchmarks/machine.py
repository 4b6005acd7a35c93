"""What a benchmark ran on: CPU, memory, GPU and library versions, read without importing the frameworks."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata

from sdjax.backends import cpu_flags, choose_cpu_kernels

PACKAGES = ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers")


def _first_field(path: str, key: str) -> str | None:
    """The value of the first `key: value` line of a /proc file."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def gpu_names() -> list[str]:
    """NVIDIA GPUs as nvidia-smi names them (none without the tool)."""
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


# The vector / matrix extensions that decide XLA's and PyTorch's CPU kernels (a CPU model name such as "AMD
# EPYC" covers machines with and without AVX-512): /proc/cpuinfo flag -> name shown.
ISA_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512F", "avx512_bf16": "AVX-512 BF16",
             "avx512_vnni": "AVX-512 VNNI", "avx512_fp16": "AVX-512 FP16", "amx_tile": "AMX", "amx_bf16": "AMX-BF16",
             "amx_int8": "AMX-INT8"}


def isa_extensions(flags: str | None = None) -> list[str]:
    """The ISA_FLAGS present in a /proc/cpuinfo "flags" line (default: this machine's), in ISA_FLAGS' order."""
    present = set(flags.split()) if flags is not None else cpu_flags()
    return [name for flag, name in ISA_FLAGS.items() if flag in present]


# Machines are told apart by their widest vector / matrix extension: XLA's and PyTorch's CPU kernels, and
# so the ratio between them, change with it (BENCHMARKS.md keeps one section per class).
ISA_CLASSES = (("amx", "amx_tile", "with AMX"), ("avx512", "avx512f", "with AVX-512, no AMX"),
               ("avx2", "avx2", "with AVX2, no AVX-512"))


def section(device: str, flags: set[str] | None = None, preset: str = "sd15") -> tuple[str, str]:
    """(key, title) of the BENCHMARKS.md section a run on `device` belongs to: per ISA class on CPUs
    ("cpu-avx2", "CPU with AVX2, no AVX-512"), one per device kind otherwise; presets other than sd15
    get sections of their own ("cpu-avx2-sdxl", "CPU with AVX2, no AVX-512: sdxl preset")."""
    key, title = _device_section(device, flags)
    return (key, title) if preset == "sd15" else (f"{key}-{preset}", f"{title}: {preset} preset")


def _device_section(device: str, flags: set[str] | None) -> tuple[str, str]:
    if device != "cpu":
        return device, device.upper()
    present = cpu_flags() if flags is None else flags
    for key, flag, title in ISA_CLASSES:
        if flag in present:
            return f"cpu-{key}", f"CPU {title}"
    return "cpu-other", "CPU without AVX2"


def describe_machine() -> str:
    """e.g. "AMD EPYC 7B13, 2 logical CPUs (AVX2, FMA, AVX-512F), 23.5 GiB RAM, GPU: none"."""
    cpu = _first_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU"
    mem_kib = _first_field("/proc/meminfo", "MemTotal")
    ram = f"{int(mem_kib.split()[0]) / 2 ** 20:.1f} GiB RAM" if mem_kib else "RAM unknown"
    isa = ", ".join(isa_extensions()) or "none of " + "/".join(ISA_FLAGS.values())
    return f"{cpu}, {os.cpu_count()} logical CPUs (ISA: {isa}), {ram}, GPU: {', '.join(gpu_names()) or 'none'}"


def describe_cpu_kernels(device: str) -> str:
    """Which kernels run the sdjax workers' convolutions on the CPU: the library (sdjax.backends), Winograd
    (sdjax.models.layers) and the scheduler."""
    if device != "cpu":
        return ""
    from sdjax.backends import SCHEDULER_FLAG, YNN_FLAG
    from sdjax.models.layers import CPU_WINOGRAD_MIN_CHANNELS

    user_flags = os.environ.get("XLA_FLAGS", "")
    added = choose_cpu_kernels(dict(os.environ))
    if added:
        kernels = f"XLA:CPU convolutions in XLA's own kernels, dots in YNNPACK ({added}: no AVX-512)"
    elif YNN_FLAG in user_flags or SCHEDULER_FLAG in user_flags:
        kernels = f"XLA_FLAGS={user_flags}"
    else:
        kernels = "XLA:CPU's default kernels"
    scheduler = "" if SCHEDULER_FLAG in user_flags else ", memory-minimising scheduler"
    return f"; {kernels}, float32 3x3 convolutions of >= {CPU_WINOGRAD_MIN_CHANNELS} channels by Winograd F(2x2, 3x3){scheduler}"


def describe_versions() -> str:
    """e.g. "python 3.11.9, jax 0.10.2, ..." for the libraries the benchmark compares."""
    versions = [f"python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return ", ".join(versions)
