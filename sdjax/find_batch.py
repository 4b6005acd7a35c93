"""The largest per-chip batch whose compiled program fits a memory capacity, in few compiles.

A program's memory is close to linear in its batch (state and code are fixed, activations grow per row),
so two compiles give the line and its prediction is confirmed by compiling it and the next batch.
Where the line misleads (layouts or rematerialisation change with the batch), a search between a batch
that fits and one that does not finds the answer; every batch is compiled at most once.
"""

from __future__ import annotations

import math
from typing import Any, Callable


def largest_fitting_batch(bytes_at: Callable[[int], int | None], capacity: int, limit: int = 4096) -> dict[str, Any]:
    """The largest b in [1, limit] with bytes_at(b) <= capacity (b = 0 when even 1 does not fit), assuming
    bytes_at grows with b; bytes_at returns None for a batch the compiler refused (over memory: it does not
    fit). Returns batch_per_chip, its bytes, the next batch's bytes (None at the limit or when refused),
    the batches refused, the line's prediction and every (batch, bytes) compiled."""
    seen: dict[int, int | None] = {}

    def fits(b: int) -> bool:
        if b not in seen:
            found = bytes_at(b)
            seen[b] = None if found is None else int(found)
        return seen[b] is not None and seen[b] <= capacity

    predicted = None
    if not fits(1):
        best = 0
    elif limit == 1 or not fits(2):
        best = 1
    else:
        slope = seen[2] - seen[1]
        low, high = 2, None  # low fits; high (when known) does not
        # A flat start (the compiler packs a second row into the same buffers) predicts nothing: the probes
        # then climb from 2, where jumping to the limit would compile the largest, slowest program first.
        if slope > 0:
            predicted = min(limit, max(2, 1 + math.floor((capacity - seen[1]) / slope)))
            if fits(predicted):
                low = predicted
            else:
                high = predicted
        step = 1
        while high is None and low < limit:  # the line was short: probe upward, widening the step, to a failure
            probe = min(limit, low + step)
            if not fits(probe):
                high = probe
                break
            low, step = probe, step * 2
        while high is not None and high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        best = low
    return {"batch_per_chip": best, "bytes": seen.get(best), "next_bytes": seen.get(best + 1),
            "capacity_bytes": capacity, "predicted": predicted, "compiles": len(seen),
            "refused": sorted(b for b, n in seen.items() if n is None),
            "compiled": sorted((b, n) for b, n in seen.items() if n is not None)}


__all__ = ["largest_fitting_batch"]
