"""The local side of the store: memory-mapped reads faulted in by the thread that reads ahead."""

from __future__ import annotations

import contextlib
import mmap
import os

from actcache.format import layout

_MADV_POPULATE_READ = 22  # linux/mman.h; Python's mmap module does not name it yet


def _prefault(m: mmap.mmap) -> None:
    """Fault a mapping's pages in now, in the calling (prefetch) thread, rather than when they are first used."""
    try:
        m.madvise(_MADV_POPULATE_READ)  # Linux >= 5.14
    except (OSError, AttributeError):  # older kernels: read ahead; no madvise (Windows): nothing to do
        with contextlib.suppress(OSError, AttributeError):
            m.madvise(mmap.MADV_WILLNEED)


def layout_folder_holding(path: str) -> str | None:
    """The folder of a store's own layout that holds the local ``path`` (or is it), or None: a set's folder (a set
    id name holding a manifest, ``shards`` or ``done``), ``_tokens`` or ``_content``. Compared through links and
    ``..``. A store, an export or a shuffled copy written there would mix with files whose names actcache owns."""
    p = os.path.realpath(path)
    while os.path.dirname(p) != p:
        name = os.path.basename(p)
        if name in (layout.TOKENS_ROOT, layout.CONTENT_ROOT):
            return p
        if layout.SET_ID_RE.match(name) and any(os.path.lexists(os.path.join(p, n)) for n in _SET_ENTRIES):
            return p
        p = os.path.dirname(p)
    return None


_SET_ENTRIES = (layout.MANIFEST, "shards", "done", layout.SPILL)
