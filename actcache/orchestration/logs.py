"""Prefect's loggers seen from the library: the run's logger where there is one, and a console without the
tracebacks of user errors."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from actcache.errors import user_error


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The current Prefect run's logger (its lines reach the UI); outside a run, the ``actcache`` logger."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a Prefect run
        return logging.getLogger("actcache")


class _UserErrorsOffConsole(logging.Filter):
    """Drops, from a console handler only, the records that carry an ActcacheError's traceback.

    Prefect logs a failed task or flow with its traceback before the caller sees the error; for an
    ActcacheError the caller prints its one line instead. The API handler still sends the record, so the
    Prefect UI keeps the traceback; ``--debug`` keeps it on the console too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return user_error(exc) is None


_FILTER = _UserErrorsOffConsole()


@contextlib.contextmanager
def user_errors_off_console(enabled: bool = True) -> Iterator[None]:
    """While inside, Prefect's console handlers print no traceback of an ActcacheError (see above)."""
    with console_filter(_FILTER, enabled=enabled):
        yield


@contextlib.contextmanager
def console_filter(f: logging.Filter, enabled: bool = True) -> Iterator[None]:
    """While inside, ``f`` filters what Prefect's console handlers print (its API handler still sends all)."""
    if not enabled:
        yield
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    handlers = {
        h
        for lg in loggers
        if isinstance(lg, logging.Logger)
        for h in lg.handlers
        if isinstance(h, PrefectConsoleHandler)
    }
    for h in handlers:
        h.addFilter(f)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(f)
