"""The errors users see, and how they are shown: one line, an exit code, the whole chain on request.

Exit codes: 2 bad input (what the user passed is wrong: the line says what to fix, nothing was written),
1 failure (disk full, a store unreachable or removed, the Prefect API lost, a damaged set: rerun to resume),
130 interrupted. ``--debug`` or ``ACTCACHE_TRACEBACK=1`` print every exception of the chain first, with the
original cause (``raise ... from e``), including errors raised inside transformers or TransformerLens.

A message names config fields with ``opt("context_size")``: it reads ``context_size`` where the config is
what users write (Python, flow parameters, deployments) and ``--context-size`` on the command line
(``ActcacheError.for_cli``; a field whose flag is spelled otherwise, e.g. ``rows_per_shard`` as
``--shard-rows``, is looked up in the CLI's ``flag_names``). The raw message keeps the marks, so the error
carries the fields it names (``fields``); a message that names its field in plain words (``unknown hook ...``)
passes ``field=``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

_OPT = re.compile(r"\{opt:([a-z_]+)(?:=([^{}]*))?\}")
_UNSET: Any = object()


def opt(field: str, value: Any = _UNSET) -> str:
    """A config field (optionally with the value to give it) inside an error message."""
    return f"{{opt:{field}}}" if value is _UNSET else f"{{opt:{field}={value!r}}}"


def render(message: str, *, flags: bool = False, flag_names: Mapping[str, str] | None = None) -> str:
    """``message`` with its fields as config names (``prepend_bos=False``) or as flags (``--no-prepend-bos``;
    ``flag_names`` maps a field to its flag where that is not ``--`` + the field's name)."""

    def one(m: re.Match) -> str:
        field, value = m.group(1), m.group(2)
        if not flags:
            return field if value is None else f"{field}={value}"
        flag = (flag_names or {}).get(field) or "--" + field.replace("_", "-")
        if value is None or value == "True":
            return flag
        if value == "False":
            return "--no-" + flag.removeprefix("--")
        return f"{flag} {value.strip(chr(39))}"

    return _OPT.sub(one, message)


class ActcacheError(Exception):
    """A user-facing problem: ``str(exc)`` is one line saying what is wrong and how to fix it.

    Bad input unless a subclass says otherwise (``exit_code``). The CLI prints ``for_cli()``.
    """

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None):
        from actcache.storage.secrets import redact  # here: secrets imports this module

        # Redacted once, here: a path or URL a message echoes (``opt(field, value)``, a path that was not found) never
        # carries a credential out, to the command line, a Python caller, a log or a Prefect state.
        super().__init__(redact(" ".join(message.split())))
        self.field = field
        """The config field at fault, where the message names it in plain words (``unknown hook ...``)."""

    @property
    def fields(self) -> list[str]:
        """The config fields this error is about (what to change)."""
        marked = [m.group(1) for m in _OPT.finditer(self.args[0])]
        return list(dict.fromkeys([self.field, *marked] if self.field else marked))

    def __str__(self) -> str:
        return render(self.args[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def for_cli(self, flag_names: Mapping[str, str] | None = None) -> str:
        return render(self.args[0], flags=True, flag_names=flag_names)


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


class LineTracker:
    """A stderr that remembers whether its last write ended a line: a library that writes a message without its
    newline (Prefect's "Error logging to API") must not swallow the start of our error line."""

    def __init__(self, stream: Any):
        self._stream, self.at_line_start = stream, True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def tracked_stderr() -> Iterator[None]:
    """While inside, ``sys.stderr`` is a ``LineTracker`` (``report`` starts a new line where one is needed)."""
    before = sys.stderr
    sys.stderr = LineTracker(before)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stderr = before


def report(exc: BaseException, *, debug: bool = False, flag_names: Mapping[str, str] | None = None) -> int:
    """Print ``exc`` on stderr for a person on the command line (one line, fields as flags; the whole chain
    first when ``debug``); the exit code."""
    if isinstance(sys.stderr, LineTracker) and not sys.stderr.at_line_start:
        print(file=sys.stderr)
    from actcache.console import printable  # one line, whatever a set's fields hold
    from actcache.storage.secrets import redact  # a library's message may echo a URL with its credentials

    if debug:
        print(redact("".join(traceback.format_exception(exc))), end="", file=sys.stderr)

    if isinstance(exc, KeyboardInterrupt):
        print("actcache: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    err = user_error(exc)
    if err is not None:
        print(f"actcache: error: {printable(redact(err.for_cli(flag_names)))}", file=sys.stderr)
        return err.exit_code
    print(f"actcache: error: {printable(redact(unexpected(exc)))}", file=sys.stderr)
    return 1


def unexpected(e: BaseException) -> str:
    """One line for a failure that is not the user's input (lost Prefect API, a bug): what, and what now."""
    if lost_api(e):
        api = os.environ.get("PREFECT_API_URL") or "Prefect's temporary server"
        return (
            f"lost the Prefect API ({api}: {type(e).__name__}); start it again and rerun the same command: "
            "finished shards are kept"
        )
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first} (rerun the same command to resume; --debug shows the traceback)"


def lost_api(e: BaseException) -> bool:
    names = {t.__name__ for t in type(e).__mro__}
    return bool(
        names & {"ConnectError", "ConnectTimeout", "RemoteProtocolError", "ReadError", "PrefectHTTPStatusError"}
    )
