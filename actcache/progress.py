"""Progress on long work: a tqdm bar on a terminal, a log line per step, a Prefect progress artifact in the UI."""

from __future__ import annotations

import contextvars
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

ARTIFACT_EVERY_S = 5.0


class _Publisher:
    """Sends progress-artifact updates from a background thread, newest value only.

    Each update is a blocking API call (~5-100 ms, more when the server is busy); made on the thread that runs
    the forward passes it was most of the per-shard overhead at GPU-class speed (bench: pipeline_overhead).
    """

    def __init__(self, artifact_id: Any):
        self.artifact_id = artifact_id
        self._value: float | None = None
        self._closed = False
        self._cv = threading.Condition()
        # The Prefect settings and run context (e.g. which API) are context variables: take them along.
        ctx = contextvars.copy_context()
        self._thread = threading.Thread(target=ctx.run, args=(self._loop,), name="actcache-progress", daemon=True)
        self._thread.start()

    def publish(self, value: float) -> None:
        with self._cv:
            self._value = value
            self._cv.notify()

    def _loop(self) -> None:
        from prefect.artifacts import update_progress_artifact

        while True:
            with self._cv:
                while self._value is None and not self._closed:
                    self._cv.wait()
                if self._value is None:
                    return
                value, self._value = self._value, None
            try:
                update_progress_artifact(self.artifact_id, progress=value)
            except Exception:
                pass  # progress is for people watching the UI; it never fails a run

    def close(self, wait_s: float) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(wait_s)


class Progress:
    """Counts ``total`` steps. Inside a flow run with a ``key``, a progress artifact of that key shows the count
    in the UI (unkeyed artifacts break `prefect artifact ls --all`: none without one). ``log`` is called with one
    line per step that ``advance(item=...)`` names, with rate and ETA: what logs get instead of a bar."""

    def __init__(
        self,
        total: int,
        unit: str = "shard",
        label: str = "extract",
        key: str | None = None,
        log: Callable[[str], Any] | None = None,
    ):
        from tqdm.auto import tqdm

        self.total, self.done, self.tokens, self.started = total, 0, 0, time.perf_counter()
        self.unit, self.log = unit, log
        self._published = self.started
        # disable=None: a bar on a terminal, none in logs and pipes (no carriage returns in a log file).
        self.bar = tqdm(
            total=total, unit=unit, desc=label, file=sys.stderr, disable=True if total == 0 else None, leave=True
        )
        self.publisher: _Publisher | None = None
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import FlowRunContext

            # Outside a flow run: nowhere to publish; nothing to do: no empty artifact ("extract: 0 shards").
            if key is not None and total > 0 and FlowRunContext.get() is not None:
                artifact = create_progress_artifact(progress=0.0, key=key, description=f"{label}: {total} {unit}s")
                self.publisher = _Publisher(artifact)
        except Exception:
            pass  # progress never fails a run

    def advance(self, n: int = 1, tokens: int = 0, item: str | None = None) -> None:
        self.done += n
        self.tokens += tokens
        self.bar.update(n)
        now = time.perf_counter()
        if item is not None and self.log is not None:
            self.log(self.line(item, now))
        # At most once per ARTIFACT_EVERY_S (the server records every update), and always the last one.
        if (
            self.publisher is not None
            and self.total
            and (self.done >= self.total or now - self._published >= ARTIFACT_EVERY_S)
        ):
            self._published = now
            # A count past its total is a miscount upstream; the UI's percentage still stops at 100.
            self.publisher.publish(min(100.0, 100.0 * self.done / self.total))

    def line(self, item: str, now: float | None = None) -> str:
        """``item: 3/8 shards, 15234 tokens/s, ETA 0:01:05`` (rate and ETA over everything done so far)."""
        elapsed = (now or time.perf_counter()) - self.started
        rate = f"{self.tokens / elapsed:.0f} tokens/s" if elapsed > 0 else "- tokens/s"
        left = max(self.total - self.done, 0)
        eta = _clock(elapsed / self.done * left) if self.done else "-"
        return f"{item}: {self.done}/{self.total} {self.unit}s, {rate}, ETA {eta}"

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def close(self, failed: bool = False) -> None:
        self.bar.close()
        if self.publisher is not None:
            # Let the last update land (the UI shows 100%), but never hold up a failure's message.
            self.publisher.close(wait_s=0 if failed else 10)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)  # also on failure, so an error message starts on a line of its own


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Window:
    """At most ``size`` futures in flight; results come back in submission order."""

    def __init__(self, size: int, on_result=None):
        self.size, self.on_result = size, on_result
        self.pending: deque = deque()
        self.results: list[Any] = []

    def add(self, future: Any) -> None:
        self.pending.append(future)
        while len(self.pending) > self.size:
            self._pop()

    def _pop(self) -> None:
        result = self.pending.popleft().result()
        self.results.append(result)
        if self.on_result:
            self.on_result(result)

    def drain(self) -> list[Any]:
        while self.pending:
            self._pop()
        return self.results
