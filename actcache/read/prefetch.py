"""Reading ahead in background threads: shard loads in flight (``prefetched``), an iterator advanced by a thread
(``background``), and retries of transient storage errors (``retried``)."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

from actcache.storage.retry import is_transient

log = logging.getLogger(__name__)

RETRY_DELAYS = (1.0, 2.0, 8.0, 30.0)
"""Seconds to wait before each new attempt at a shard read that failed transiently (as uploads do)."""


def _pause(seconds: float, stop: threading.Event) -> bool:
    """Wait before a retry; True when the reader was stopped meanwhile."""
    return stop.wait(seconds)


def retried(fn: Callable[[], Any], what: str, stop: threading.Event) -> Any:
    """``fn()``, again after each of ``RETRY_DELAYS`` while it fails with a transient storage error."""
    for delay in RETRY_DELAYS:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            log.warning("%s failed (%s); retrying in %.0f s", what, e, delay)
            if _pause(delay, stop):
                raise
    return fn()


def prefetched(load: Callable[[Any], Any], items: Iterable[Any], depth: int) -> Iterator[Any]:
    """``load(item)`` for each item, in order, by ``depth`` background threads: at most ``depth`` items are
    loading or loaded ahead of the one the consumer holds. A load's error is raised at that item's turn."""
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="actcache-prefetch")
    it = iter(items)
    pending = deque(pool.submit(load, item) for item in islice(it, depth))
    try:
        while pending:
            future = pending.popleft()  # (rebinding drops the previous item: nothing here holds it while waiting)
            for item in islice(it, 1):  # keep ``depth`` in flight while the consumer works on this one
                pending.append(pool.submit(load, item))
            yield future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # running loads finish in their thread, then it exits


def background(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``items`` advanced by a background thread, at most ``depth`` ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    break
            else:
                put(("end", None))
        except BaseException as e:  # handed to the consumer, raised there
            put(("error", e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # in this thread: a generator may only be closed by the thread running it

    thread = threading.Thread(target=work, name="actcache-background", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        # Wait for the thread to leave its current item: a daemon thread still inside torch when the interpreter
        # exits aborts the process ("terminate called without an active exception").
        if thread is not threading.current_thread():
            thread.join(timeout=30)
