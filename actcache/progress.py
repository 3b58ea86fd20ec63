"""Progress on long work: a tqdm bar on a terminal, a log line per step, a Prefect progress artifact in the UI."""

from __future__ import annotations

import contextvars
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from actcache.orchestration import artifacts

ARTIFACT_EVERY_S = 5.0


class _Publisher:
    """Sends progress-artifact updates from a background thread, newest value only.

    Each update is a blocking API call: here it does not hold up the thread that runs the forward passes
    (bench: pipeline_overhead; figures in bench/RESULTS.md).
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
        while True:
            with self._cv:
                while self._value is None and not self._closed:
                    self._cv.wait()
                if self._value is None:
                    return
                value, self._value = self._value, None
            try:
                artifacts.update_progress(self.artifact_id, value)
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
    line per step that ``advance(item=...)`` names, with rate and ETA: what Prefect's records get.

    On a terminal a bar (redrawn every second, so that its clock runs even while one step takes long); with
    ``tokens`` (the tokens all steps compute), the bar counts tokens as the forward passes finish them
    (``computed``), so that it moves within a long shard. Off a terminal, on the command line (``console.quiet``),
    one line every ``LINE_EVERY_S`` instead: Prefect's records keep the per-step lines.
    """

    def __init__(
        self,
        total: int,
        unit: str = "shard",
        label: str = "extract",
        key: str | None = None,
        log: Callable[[str], Any] | None = None,
        tokens: int | None = None,
    ):
        from actcache import console

        console.end_status()  # the bar takes the status line's place
        self.total, self.done, self.tokens, self.started = total, 0, 0, time.perf_counter()
        self.unit, self.label, self.log = unit, label, log
        self.tokens_total, self._computed, self._shard_cap = tokens, 0, 0
        self._published = self._printed = self.started
        self._lines = console.quiet() and not console.on_terminal() and total > 0
        self.bar = _bar(tokens if tokens else total, "token" if tokens else unit, label, disable=total == 0)
        if tokens:
            self.bar.set_postfix_str(f"0/{total} {unit}s stored", refresh=False)
        self._refresher = _Refresher(self.bar.refresh) if not self.bar.disable else None
        self.publisher: _Publisher | None = None
        try:
            # Outside a flow run: nowhere to publish; nothing to do: no empty artifact ("extract: 0 shards").
            artifact = (
                None if key is None or total == 0 else artifacts.create_progress(key, f"{label}: {total} {unit}s")
            )
            if artifact is not None:
                self.publisher = _Publisher(artifact)
        except Exception:
            pass  # progress never fails a run
        _ACTIVE.append(self)

    def shard(self, n_tokens: int) -> None:
        """A forward pass over ``n_tokens`` starts: ``computed`` counts within it, up to that many."""
        self._shard_cap = self._computed + n_tokens

    def computed(self, n_tokens: int) -> None:
        """A batch of ``n_tokens`` went through the model (the bar moves within the shard)."""
        if not self.tokens_total:
            return
        step = max(0, min(n_tokens, self._shard_cap - self._computed))
        self._computed += step
        self.bar.update(step)
        self._maybe_print()

    def advance(self, n: int = 1, tokens: int = 0, item: str | None = None) -> None:
        self.done += n
        self.tokens += tokens
        if self.tokens_total:
            self.bar.set_postfix_str(f"{self.done}/{self.total} {self.unit}s stored", refresh=False)
            self.bar.refresh()
        else:
            self.bar.update(n)
        now = time.perf_counter()
        if item is not None and self.log is not None:
            self.log(self.line(item, now))
        self._maybe_print(now, last=self.done >= self.total)
        # At most once per ARTIFACT_EVERY_S (the server records every update), and always the last one.
        if (
            self.publisher is not None
            and self.total
            and (self.done >= self.total or now - self._published >= ARTIFACT_EVERY_S)
        ):
            self._published = now
            # A count past its total is a miscount upstream; the UI's percentage still stops at 100.
            self.publisher.publish(min(100.0, 100.0 * self.done / self.total))

    def _maybe_print(self, now: float | None = None, last: bool = False) -> None:
        now = now or time.perf_counter()
        if self._lines and (last or now - self._printed >= LINE_EVERY_S):
            self._printed = now
            print(self.line(self.label, now), file=sys.stderr, flush=True)

    def line(self, item: str, now: float | None = None) -> str:
        """``item: 3/8 shards, 15234 tokens/s, ETA 0:01:05`` (rate and ETA over everything done so far)."""
        elapsed = (now or time.perf_counter()) - self.started
        tokens = max(self.tokens, self._computed)
        rate = f"{tokens / elapsed:.0f} tokens/s" if elapsed > 0 else "- tokens/s"
        if self.tokens_total and self._computed:
            left = max(self.tokens_total - self._computed, 0)
            eta = _clock(elapsed / self._computed * left)
        else:
            left = max(self.total - self.done, 0)
            eta = _clock(elapsed / self.done * left) if self.done else "-"
        return f"{item}: {self.done}/{self.total} {self.unit}s, {rate}, ETA {eta}"

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def close(self, failed: bool = False) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self._refresher is not None:
            self._refresher.stop()
        self.bar.close()
        if self.publisher is not None:
            # Let the last update land (the UI shows 100%), but never hold up a failure's message.
            self.publisher.close(wait_s=0 if failed else 10)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)  # also on failure, so an error message starts on a line of its own


LINE_EVERY_S = 10.0
"""Off a terminal, on the command line: one progress line this often (and the last)."""

_ACTIVE: list[Progress] = []


def shard_started(n_tokens: int) -> None:
    """The extract step tells the running extraction's bar (in this process) that a pass over a shard starts."""
    for p in _ACTIVE[-1:]:
        p.shard(n_tokens)


def computed(n_tokens: int) -> None:
    """The forward pass tells the running extraction's bar (in this process) that a batch is done."""
    for p in _ACTIVE[-1:]:
        p.computed(n_tokens)


def _bar(total: int | None, unit: str, label: str, disable: bool = False) -> Any:
    """A bar with its total on stderr, only on a terminal (``disable=None``: no carriage returns in a log)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit=unit,
        unit_scale=unit == "token",
        desc=label,
        file=sys.stderr,
        disable=True if disable else None,
        leave=True,
        dynamic_ncols=True,
    )


class _Refresher:
    """Calls ``redraw`` every second (a bar's refresh, so its clock runs while one step takes long: nothing silent
    for 5 s on a terminal; or a due progress line in a log)."""

    def __init__(self, redraw: Callable[[], Any], every_s: float = 1.0):
        self.redraw, self._stop = redraw, threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), name="actcache-bar", daemon=True)
        self._thread.start()

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.redraw()
            except Exception:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


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

    def settle(self) -> None:
        """Wait until every future in flight has ended, whatever its outcome (results and errors unread): what a
        run that is being stopped does, so that no write is cut off half way."""
        while self.pending:
            self.pending.popleft().wait()


class Steps:
    """A command's steps (shards copied, exported, ...): made when the total is known, so that a command with
    nothing to do shows nothing. A bar with ``N/M`` on a terminal; on the command line off a terminal, a line
    every ``LINE_EVERY_S`` (also while one step takes long) and the last one (``label: N/M units``); nothing else
    in logs and pipes."""

    def __init__(self, label: str, unit: str):
        self.label, self.unit = label, unit
        self.done: int = 0
        self.n: int | None = None
        self.bar: Any = None
        self._refresher: _Refresher | None = None
        self._started = self._printed = time.perf_counter()
        self._lines = False
        self._lock = threading.Lock()

    def total(self, n: int) -> None:
        """Set (or correct) how many steps there are; the first call shows the bar."""
        from actcache import console

        self.n = n
        if self.bar is None:
            console.end_status()
            self.bar = _bar(n, self.unit, self.label, disable=n == 0)
            self._lines = console.quiet() and not console.on_terminal() and n > 0
            if not self.bar.disable:  # its clock runs while one step (a big shard, a commit) takes long
                self._refresher = _Refresher(self.bar.refresh)
            elif self._lines:
                self._refresher = _Refresher(self._line)
        else:
            self.bar.total = n
            self.bar.refresh()

    def advance(self, n: int = 1) -> None:
        if self.bar is None:
            self.total(0)
        self.done += n
        self.bar.update(n)
        self._line(last=self.done == self.n)

    def _line(self, last: bool = False) -> None:
        """Off a terminal: the count, if ``LINE_EVERY_S`` passed since the last line (or this is the last step)."""
        with self._lock:
            now = time.perf_counter()
            due = now - self._printed >= LINE_EVERY_S and self.done != self.n  # (the last line is said once)
            if self._lines and (last or due):
                self._printed = now
                print(f"{self.label}: {self.done}/{self.n} {self.unit}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._refresher is not None:
            self._refresher.stop()
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
