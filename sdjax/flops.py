"""FLOP accounting: what XLA says a compiled program costs, and what this machine can do."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled jax program on one device, from XLA's cost analysis (0 if
    unavailable). XLA counts a loop body (lax.scan / while) once, not once per iteration."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


@functools.lru_cache(maxsize=None)
def measured_peak_flops(dtype: str = "float32", side: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on the first device: the practical peak MFU is measured against."""
    a = jnp.ones((side, side), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * side ** 3 / best
