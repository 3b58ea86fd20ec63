"""Fault injection for the crash tests: ``ACTCACHE_FAULT=point:n`` SIGKILLs this process the n-th time
it reaches ``point``; ``point:n:hang`` stalls the thread there for good instead (a stalled node, a forward pass
that never ends). The stalled thread handles signals as a slow pass does between its kernels: a SIGTERM (a
cancel) stops it as it would stop that pass. Unset (always, outside tests) it costs one ``is None`` check per call.

The kill is real (no cleanup, no ``finally``): it is how a preempted GPU node or an OOM kill ends a run.
"""

from __future__ import annotations

import os
import signal
import threading
import time

POINTS = (
    "tokenize.token-shard-written",  # token shard bytes in place, no record yet
    "tokenize.token-record-written",
    "extract.forward-done",
    "compress.encoded",
    "store.temp-written",  # a local write's temp file is complete, not yet renamed
    "upload.shard-written",  # shard bytes in place, no completion record yet
    "upload.record-written",
    "manifest.before-write",
    "manifest.written",
)

# The shuffle's own points (``actcache shuffle`` runs outside the extraction flow).
SHUFFLE_POINTS = (
    "shuffle.spill-written",  # a source shard's spill file in place, no spill record yet
    "shuffle.spill-recorded",
    "shuffle.shard-written",  # an output shard in place, no completion record yet
    "shuffle.shard-recorded",
    "shuffle.manifest-written",  # the set is complete, its spill files not yet removed
)

# `actcache cp` (actcache/sets/copy.py), after a shard's bytes and after its record.
COPY_POINTS = ("cp.shard-written", "cp.record-written")

# `actcache rm` (actcache/sets/cleanup.py), after each kind of file is deleted.
RM_POINTS = ("rm.manifest-removed", "rm.records-removed", "rm.shards-removed")

_SPEC = os.environ.get("ACTCACHE_FAULT") or None
_COUNTS: dict[str, int] = {}
_LOCK = threading.Lock()


def point(name: str) -> None:
    if _SPEC is None:
        return
    target, _, rest = _SPEC.partition(":")
    if name != target:
        return
    nth, _, mode = rest.partition(":")
    with _LOCK:
        _COUNTS[name] = _COUNTS.get(name, 0) + 1
        hit = _COUNTS[name] == int(nth or 1)
    if hit and mode == "hang":
        # Short sleeps, not one endless wait: a thread blocked on a lock does not run Python's signal handlers
        # when the signal reaches another thread of the process, and a real forward pass returns to Python often.
        while True:
            time.sleep(0.2)
    elif hit:
        os.kill(os.getpid(), signal.SIGKILL)
