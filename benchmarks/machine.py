"""What a benchmark ran on: CPU, memory, GPU and library versions, read without importing the frameworks."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata

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


def describe_machine() -> str:
    """e.g. "AMD EPYC 7B13, 2 logical CPUs, 23.5 GiB RAM, GPU: none"."""
    cpu = _first_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU"
    mem_kib = _first_field("/proc/meminfo", "MemTotal")
    ram = f"{int(mem_kib.split()[0]) / 2 ** 20:.1f} GiB RAM" if mem_kib else "RAM unknown"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {ram}, GPU: {', '.join(gpu_names()) or 'none'}"


def describe_versions() -> str:
    """e.g. "python 3.11.9, jax 0.10.2, ..." for the libraries the benchmark compares."""
    versions = [f"python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return ", ".join(versions)
