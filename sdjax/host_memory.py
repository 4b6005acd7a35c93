"""Host memory that the C heap keeps after XLA compiles a program.

Compiling a large program (SD 1.5's train step on CPU: about 1 GiB) allocates the compiler's data on
the C heap. glibc keeps the freed pages for later use instead of returning them, and the program's
own buffers are then allocated beside them, so the process's peak holds both.
"""

from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only (not musl or macOS)


def release_freed_heap() -> None:
    """Hands the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing). Call it
    after compiling: SD 1.5's train step on CPU then peaks at 18.4 GiB instead of 19.5 GiB."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
