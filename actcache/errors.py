"""The errors users see, and how they are shown: one line, an exit code, the whole chain on request.

Exit codes: 2 bad input (what the user passed is wrong: the line says what to fix, nothing was written),
1 failure (disk full, a store unreachable or removed, the Prefect API lost, a damaged set: rerun to resume),
130 interrupted. ``--debug`` or ``ACTCACHE_TRACEBACK=1`` print every exception of the chain first, with the
original cause (``raise ... from e``), including errors raised inside transformers or TransformerLens.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator


class ActcacheError(Exception):
    """A user-facing problem: ``str(exc)`` is one line saying what is wrong and how to fix it.

    Bad input unless a subclass says otherwise (``exit_code``).
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class Failure(ActcacheError):
    """Not the input: the environment failed (disk full, storage unreachable or gone); a rerun resumes."""

    exit_code = 1


def user_error(exc: BaseException | None) -> ActcacheError | None:
    """The ActcacheError ``exc`` is or carries (as a cause or context), e.g. once a library wrapped it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ActcacheError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


_DEBUG = [False]


def debug_requested() -> bool:
    """``--debug`` (while the command runs) or ``ACTCACHE_TRACEBACK=1``."""
    return _DEBUG[0] or os.environ.get("ACTCACHE_TRACEBACK", "") not in ("", "0")


@contextlib.contextmanager
def debugging(on: bool) -> Iterator[None]:
    before, _DEBUG[0] = _DEBUG[0], _DEBUG[0] or on
    try:
        yield
    finally:
        _DEBUG[0] = before


def report(exc: BaseException, *, debug: bool = False) -> int:
    """Print ``exc`` on stderr for a person (one line; the whole chain first when ``debug``); the exit code."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt):
        print("actcache: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    err = user_error(exc)
    if err is not None:
        print(f"actcache: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"actcache: error: {unexpected(exc)}", file=sys.stderr)
    return 1


def unexpected(e: BaseException) -> str:
    """One line for a failure that is not the user's input (lost Prefect API, a bug): what, and what now."""
    if lost_api(e):
        api = os.environ.get("PREFECT_API_URL") or "Prefect's temporary server"
        return (f"lost the Prefect API ({api}: {type(e).__name__}); start it again and rerun the same command: "
                "finished shards are kept")
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first} (rerun the same command to resume; --debug shows the traceback)"


def lost_api(e: BaseException) -> bool:
    names = {t.__name__ for t in type(e).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "RemoteProtocolError", "ReadError",
                         "PrefectHTTPStatusError"})


class _UserErrorsOffConsole(logging.Filter):
    """Drops, from a console handler only, the records that carry an ActcacheError's traceback.

    Prefect logs a failed task or flow with its traceback (80-110 lines) before the caller sees the error;
    for an ActcacheError the caller prints its one line instead. The API handler still sends the record,
    so the Prefect UI keeps the traceback; ``--debug`` keeps it on the console too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return user_error(exc) is None


_FILTER = _UserErrorsOffConsole()


@contextlib.contextmanager
def user_errors_off_console(enabled: bool = True) -> Iterator[None]:
    """While inside, Prefect's console handlers print no traceback of an ActcacheError (see above)."""
    if not enabled:
        yield
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    handlers = {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers
                if isinstance(h, PrefectConsoleHandler)}
    for h in handlers:
        h.addFilter(_FILTER)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(_FILTER)
