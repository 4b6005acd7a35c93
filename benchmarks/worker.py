"""One measurement of one framework, in a process of its own: its peak memory is that measurement's alone, and
torch and jax never share a process.

    python -m benchmarks.worker SIDE MEASURE SETTINGS_JSON RESULT_PATH

writes the side's result (seconds, items, ...) plus the peak memory to RESULT_PATH as JSON; a failure is a
traceback on stderr and a non-zero exit.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys

from benchmarks.settings import SIDES, Settings
from sdjax import backends


def peak_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str]) -> int:
    side, measure, settings_json, result_path = argv
    backends.prepare()  # before JAX starts its backends
    if side not in SIDES:
        raise ValueError(f"side {side!r}: expected one of {', '.join(SIDES)}")
    settings = Settings.from_json(settings_json)
    if side == "sdjax":  # before jax is imported (by the side's module)
        # Pinned, so that a jax which cannot start CUDA fails instead of measuring on the CPU under the GPU's
        # name; the CPU backend stays for FLOP counts (sdjax.flops.traced_flops).
        os.environ["JAX_PLATFORMS"] = "cuda,cpu" if settings.device == "gpu" else "cpu"
        # jax takes 75% of the GPU's memory by default; torch, in its own process, may use all of it.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    module = importlib.import_module(f"benchmarks.{side}_side")
    result = module.MEASURES[measure](settings)
    device_bytes = module.peak_device_bytes() if settings.device == "gpu" else None
    result["peak_memory_bytes"] = peak_rss_bytes() if device_bytes is None else device_bytes
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
