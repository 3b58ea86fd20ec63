"""Progress on long work: a tqdm bar on the terminal and a Prefect progress artifact in the UI."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any

ARTIFACT_EVERY_S = 5.0


class Progress:
    def __init__(self, total: int, unit: str = "shard", label: str = "extract"):
        from tqdm.auto import tqdm

        self.total, self.done, self.started = total, 0, time.perf_counter()
        self._published = self.started
        # disable=None: a bar on a terminal, none in logs and pipes.
        self.bar = tqdm(total=total, unit=unit, desc=label, file=sys.stderr, disable=True if total == 0 else None,
                        leave=True)
        self.artifact = None
        try:
            from prefect.artifacts import create_progress_artifact

            self.artifact = create_progress_artifact(progress=0.0, description=f"{label}: {total} {unit}s")
        except Exception:
            pass  # outside a flow run there is nowhere to publish it

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.perf_counter()
        # Each update is a blocking API call (~5-100 ms, more when the server is busy) on the thread that runs
        # the forward passes: publish at most once per ARTIFACT_EVERY_S, and always the last one.
        if self.artifact is not None and self.total and (self.done >= self.total
                                                          or now - self._published >= ARTIFACT_EVERY_S):
            from prefect.artifacts import update_progress_artifact

            self._published = now
            update_progress_artifact(self.artifact, progress=100.0 * self.done / self.total)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also on failure, so an error message starts on a line of its own


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
