"""FLOP accounting: what XLA says a compiled program costs, and what this machine can do."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sdjax.models.attention import BLOCKED_SCOPE
from sdjax.models.layers import counting_flops
from sdjax.models.winograd import WINOGRAD_SCOPE


def compiled_cost(compiled) -> dict[str, float]:
    """XLA's cost analysis of one call of a compiled jax program on one device (of a lowered one: on all):
    flops, bytes accessed, and on TPU the compiler's own time estimate, optimal_seconds (0 where a figure
    is missing; optimal_seconds can come back negative for large programs). XLA counts a loop body
    (lax.scan / while) once, not once per iteration."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device program
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {"flops": float(analysis.get("flops", 0.0)), "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
            "optimal_seconds": float(analysis.get("optimal_seconds", 0.0))}


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled jax program on one device (or of a lowered one, on all), from XLA's
    cost analysis (0 if unavailable), a loop body counted once."""
    return compiled_cost(compiled)["flops"]


def counts_short(compiled) -> bool:
    """Whether XLA's cost analysis of a compiled program falls short of the network's FLOPs because the
    program holds one of the CPU's own kernels: the blocked attention, a loop over query blocks whose body
    is counted once (other loops, such as the PRNG's, cost next to nothing), or Winograd convolutions,
    which compute a convolution with fewer multiplications than it is credited with."""
    text = compiled.as_text()
    return BLOCKED_SCOPE in text or WINOGRAD_SCOPE in text


def traced_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of `fn(*args)` (arrays or ShapeDtypeStructs; shardings are dropped) over all devices, from XLA's
    cost analysis of the program lowered afresh (not compiled) with every kernel in its countable one-op
    form; unlike `compiled_flops`, this counts every attention of a program whose kernel loops or is a
    custom call, and each convolution as the direct one. Raises RuntimeError if XLA reports no FLOPs."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), args)
    # Lowered for the CPU, whose client analyses programs before compiling them; GPU plugin clients
    # (the PJRT C API) do not, and jax then reports no cost at all. So `fn` may not constrain shardings
    # to a mesh of other devices.
    with counting_flops(), jax.default_device(jax.devices("cpu")[0]):
        flops = compiled_flops(jax.jit(fn).lower(*abstract))
    if not flops:
        raise RuntimeError("XLA's cost analysis reported no FLOPs for the program")
    return flops


@functools.lru_cache(maxsize=None)
def measured_peak_flops(dtype: str = "float32", side: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on the first device: the practical peak MFU is measured against."""
    # Random values: a GPU's matmul runs faster on constant data (less switching power), over its real peak.
    a = jax.random.normal(jax.random.key(0), (side, side), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * side ** 3 / best
