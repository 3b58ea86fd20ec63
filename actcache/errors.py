"""The one exception type users see: a single line saying what is wrong and how to fix it.

A message names config fields with ``opt("context_size")``: it reads ``context_size`` where the config is
what users write (Python, flow parameters, deployments) and ``--context-size`` on the command line
(``ActcacheError.for_cli``). The raw message keeps the marks, so the error carries the fields it names
(``fields``); a message that names its field in plain words (``unknown hook ...``) passes ``field=``.
"""

from __future__ import annotations

import re
from typing import Any

_OPT = re.compile(r"\{opt:([a-z_]+)(?:=([^{}]*))?\}")
_UNSET: Any = object()


def opt(field: str, value: Any = _UNSET) -> str:
    """A config field (optionally with the value to give it) inside an error message."""
    return f"{{opt:{field}}}" if value is _UNSET else f"{{opt:{field}={value!r}}}"


def render(message: str, *, flags: bool = False) -> str:
    """``message`` with its fields as config names (``prepend_bos=False``) or as flags (``--no-prepend-bos``)."""

    def one(m: re.Match) -> str:
        field, value = m.group(1), m.group(2)
        if not flags:
            return field if value is None else f"{field}={value}"
        flag = "--" + field.replace("_", "-")
        if value is None or value == "True":
            return flag
        if value == "False":
            return "--no-" + field.replace("_", "-")
        return f"{flag} {value.strip(chr(39))}"

    return _OPT.sub(one, message)


class ActcacheError(Exception):
    """A user-facing problem (bad input, missing file, unwritable store).

    The CLI prints ``for_cli()`` as one line and exits non-zero, never a traceback.
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(" ".join(message.split()))
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

    def for_cli(self) -> str:
        return render(self.args[0], flags=True)
