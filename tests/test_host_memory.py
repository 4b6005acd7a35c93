"""Giving the C heap's free pages back (after XLA compiles)."""

import ctypes

import pytest

from sdjax.host_memory import _malloc_trim, release_freed_heap


def _resident_anonymous_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(_malloc_trim() is None, reason="no glibc malloc_trim")
def test_freed_heap_pages_go_back_to_the_system():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 << 10, 4096  # 256 MiB in blocks below glibc's mmap threshold: on the heap
    blocks = [libc.malloc(size) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks[:-1]:  # the last one stays, so the heap cannot simply shrink from its top
        libc.free(block)
    before = _resident_anonymous_bytes()
    release_freed_heap()
    assert before - _resident_anonymous_bytes() > 128 << 20
    libc.free(blocks[-1])
