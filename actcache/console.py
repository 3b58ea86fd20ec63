"""What a person at a terminal sees: actcache's own status lines and bars; Prefect's run logs only on request.

The command line turns ``quiet`` on (``--verbose`` leaves it off): Prefect's per-task INFO lines then go only to
Prefect's records (the API and its UI), its failure lines too (the CLI prints the error once), while warnings
still reach the console. The Python API keeps Prefect's console lines, as any Prefect flow has them.

``status`` covers work that takes seconds before a bar can start (loading a model, starting Prefect): on a
terminal one line that counts the seconds and is cleared when the work is done; elsewhere the line printed once.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with control characters (terminal escapes, newlines, carriage returns, tabs, bidi overrides) shown as
    escapes (``\\x1b``): a set's fields are whoever wrote it, and must neither drive a terminal nor forge lines."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


TICK_S = 1.0
"""How often the status line on a terminal is redrawn (the rule: nothing silent for more than 5 s)."""

_QUIET = [False]
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


@contextlib.contextmanager
def quieted(on: bool = True) -> Iterator[None]:
    """Inside: Prefect's run logs stay off the console (what the command line does without ``--verbose``)."""
    before, _QUIET[0] = _QUIET[0], on
    try:
        yield
    finally:
        _QUIET[0] = before


def quiet() -> bool:
    """Whether Prefect's run logs stay off the console (the command line without ``--verbose``)."""
    return _QUIET[0]


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _RunLogsOffConsole(logging.Filter):
    """Keeps, of the flow and task run loggers, only warnings on the console: their INFO lines are Prefect's
    records, and a failure's lines would repeat the one line the CLI prints (``errors``: kept, for --debug)."""

    def __init__(self, errors: bool):
        super().__init__()
        self.lowest = logging.WARNING
        self.highest = logging.CRITICAL if errors else logging.WARNING

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(_RUN_LOGGERS) or self.lowest <= record.levelno <= self.highest


@contextlib.contextmanager
def run_logs_off_console(enabled: bool = True, errors: bool = False) -> Iterator[None]:
    from actcache.orchestration.logs import console_filter

    with console_filter(_RunLogsOffConsole(errors), enabled=enabled):
        yield


class _Status:
    def __init__(self, message: str, terminal_only: bool = False):
        self.message, self.started = message, time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._silent = terminal_only and not on_terminal()
        if self._silent:
            return
        if on_terminal():
            self._draw()
            self._thread = threading.Thread(target=self._loop, name="actcache-status", daemon=True)
            self._thread.start()
        else:
            print(f"{message} ...", file=sys.stderr, flush=True)

    def _draw(self) -> None:
        seconds = time.monotonic() - self.started
        with self._lock:
            if not self._stop.is_set():
                sys.stderr.write(f"\r{self.message} ... {seconds:.0f} s\x1b[K")
                sys.stderr.flush()

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            self._draw()

    def update(self, message: str) -> None:
        if message == self.message or self._stop.is_set() or self._silent:
            return
        self.message, self.started = message, time.monotonic()
        if self._thread is not None:
            self._draw()
        else:
            print(f"{message} ...", file=sys.stderr, flush=True)

    def end(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
            if self._thread is not None:
                sys.stderr.write("\r\x1b[K")  # the line goes: what follows (a bar, the summary) takes its place
                sys.stderr.flush()


_CURRENT: list[_Status] = []


@contextlib.contextmanager
def status(message: str, terminal_only: bool = False) -> Iterator[None]:
    """``message`` shown while the block runs (see the module docstring); ``update_status`` changes it.
    ``terminal_only``: nothing off a terminal (work that is seconds only on a big store: rm, gc)."""
    s = _Status(message, terminal_only)
    _CURRENT.append(s)
    try:
        yield
    finally:
        s.end()
        _CURRENT.remove(s)


def update_status(message: str) -> None:
    """Change the current status line; without one (e.g. a flow run on a worker), print nothing."""
    if _CURRENT:
        _CURRENT[-1].update(message)


def end_status() -> None:
    """Clear the status line now: a bar or the summary starts."""
    for s in _CURRENT:
        s.end()
