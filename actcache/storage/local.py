"""The local side of the store: memory-mapped reads faulted in by the thread that reads ahead."""

from __future__ import annotations

import contextlib
import mmap

_MADV_POPULATE_READ = 22  # linux/mman.h; Python's mmap module does not name it yet


def _prefault(m: mmap.mmap) -> None:
    """Fault a mapping's pages in now, in the calling (prefetch) thread, rather than when they are first used."""
    try:
        m.madvise(_MADV_POPULATE_READ)  # Linux >= 5.14
    except (OSError, AttributeError):  # older kernels: read ahead; no madvise (Windows): nothing to do
        with contextlib.suppress(OSError, AttributeError):
            m.madvise(mmap.MADV_WILLNEED)
