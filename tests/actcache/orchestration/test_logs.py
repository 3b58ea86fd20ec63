"""Prefect's loggers seen from the library: no Prefect traceback of an ActcacheError on the console (the Prefect
UI keeps it), and the run's logger inside a run, the ``actcache`` logger outside one."""

from __future__ import annotations

import logging

from actcache.errors import ActcacheError, Failure
from actcache.orchestration import logs


def _raise(exc: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as c:
            raise exc from c
    except BaseException as e:
        return e


def test_console_filter_drops_only_records_carrying_an_actcache_error(capsys):
    """Installed on Prefect's console handlers only: an ActcacheError's traceback is dropped, a bug's is kept, and
    a handler of another kind (Prefect's API handler) still gets both."""
    from prefect.logging.handlers import PrefectConsoleHandler

    console = PrefectConsoleHandler(stream=None)
    seen: list[logging.LogRecord] = []

    class Api(logging.Handler):
        def emit(self, record):
            seen.append(record)

    logger = logging.getLogger("actcache-test-console")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    printed: list[str] = []
    console.emit = lambda record: printed.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(console)
    logger.addHandler(Api())
    try:
        with logs.user_errors_off_console():
            for exc in (
                ActcacheError("user"),
                _raise(RuntimeError("wrapping"), Failure("disk full")),
                RuntimeError("a bug"),
            ):
                try:
                    raise exc
                except BaseException:
                    logger.error("task failed: %r", exc, exc_info=True)
            logger.info("a plain line")
        logger.error("after: not filtered", exc_info=(ActcacheError, ActcacheError("x"), None))
    finally:
        logger.handlers.clear()
    assert printed == ["task failed: RuntimeError('a bug')", "a plain line", "after: not filtered"]
    assert len(seen) == 5  # the API handler saw everything, tracebacks included


def test_run_logger_outside_a_run_is_the_actcache_logger():
    assert logs.run_logger() is logging.getLogger("actcache")


def test_run_logger_inside_a_flow_is_the_runs_logger(prefect_harness):
    """Warnings such as NaN/Inf in a shard reach the run's log in the UI, not only the process's stderr."""
    from prefect import flow
    from prefect.logging.loggers import PrefectLogAdapter

    @flow
    def which():
        logger = logs.run_logger()
        return isinstance(logger, PrefectLogAdapter), logger.extra.get("flow_run_name")

    is_run_logger, run_name = which()
    assert is_run_logger and run_name
