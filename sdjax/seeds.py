"""Seeds: integers in [0, 2**64), each its own random stream (image noise, a training run's draws)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

SEED_LIMIT = 2**64  # seeds are integers in [0, SEED_LIMIT)


def check_seed(seed: Any) -> int:
    """`seed` as a Python int, or ValueError if it is not an integer in [0, 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed {seed!r}: expected an integer in [0, 2**64)")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"seed {int(seed)} is out of range: seeds are integers in [0, 2**64)")
    return int(seed)


def seed_key(seed: int) -> jax.Array:
    """The threefry key of a 64-bit seed: its two 32-bit halves as the key data.

    jax.random.key(s) keeps only s mod 2**32 (so 2**32 gave seed 0's image) and overflows past
    2**63; its key data is (0, s) for s < 2**32, so building (s >> 32, s & 0xffffffff) gives every
    seed below 2**64 its own stream and leaves the images of seeds below 2**32 as they were.
    The implementation is named, so images do not change with jax's default PRNG setting.
    """
    seed = check_seed(seed)
    data = np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    return jax.random.wrap_key_data(data, impl="threefry2x32")
