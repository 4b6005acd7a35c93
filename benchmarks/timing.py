"""Wall-clock timing shared by both sides."""

from __future__ import annotations

import time
from typing import Callable


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` untimed ones; fn must block until its work is
    done (jax: block_until_ready, torch on GPU: synchronize)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds
