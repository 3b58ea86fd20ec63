"""Keep a long extraction's resident memory flat: glibc holds on to freed shard buffers unless told not to.

glibc gives each thread that allocates under contention its own arena (compress and upload run on pool threads)
and keeps freed chunks in them, so peak RSS grows with the run's length though none of it is live data. Two
arenas keep it nearly flat and an occasional trim bounds long runs. Forcing large buffers to mmap instead would
also do it, but slows the forward pass (page faults). Figures: bench/RESULTS.md, "Peak RSS".
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import threading
import time
from typing import Any

M_ARENA_MAX = -8  # from glibc's malloc.h
_LOCK = threading.Lock()
_LIBC: ctypes.CDLL | None = None
_CAPPED = False


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            return None
    return _LIBC


def cap_arenas(n: int = 2) -> None:
    """At most ``n`` malloc arenas for this process, unless the user tuned malloc through the environment.

    Takes effect for arenas created afterwards: call it before the pool threads start allocating.
    """
    global _CAPPED
    with _LOCK:
        if _CAPPED:
            return
        _CAPPED = True
        if "MALLOC_ARENA_MAX" in os.environ or "GLIBC_TUNABLES" in os.environ:
            return  # the user's setting wins
        libc = _libc()
        if libc is not None:
            libc.mallopt(M_ARENA_MAX, n)


TRIM_EVERY_S = 60.0
_last_trim = time.monotonic()


def release() -> None:
    """Return freed heap memory to the OS, at most once per TRIM_EVERY_S (called after each stored shard).

    Not after every shard: a trim takes the arena lock and hands back pages that the next forward pass
    faults in again, which slows it (bench/RESULTS.md).
    """
    global _last_trim
    libc = _libc()
    now = time.monotonic()
    with _LOCK:
        if libc is None or now - _last_trim < TRIM_EVERY_S:
            return
        _last_trim = now
    libc.malloc_trim(0)


MADV_DONTNEED = 4  # from Linux's mman.h
_PAGE = mmap.PAGESIZE


def discard(buf: Any, start: int, end: int) -> None:
    """Hand the whole pages of bytes ``start:end`` of a CPU tensor back to the OS: its contents there are no
    longer needed (they read as zeros afterwards). A no-op where glibc's madvise is not available."""
    libc = _libc()
    if libc is None:
        return
    base = buf.data_ptr()
    lo = -(-(base + start) // _PAGE) * _PAGE
    hi = (base + end) // _PAGE * _PAGE
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)
