"""Process-local hand-off of large values between tasks, so Prefect only ever sees small references.

Prefect would otherwise hash, keep and possibly persist whole tensors as task inputs and results.
The flow bounds how many shards are in flight, which bounds what this holds.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

_ITEMS: dict[str, Any] = {}
_LOCK = threading.Lock()
_IDS = itertools.count()


def put(value: Any) -> str:
    with _LOCK:
        ref = f"h{next(_IDS)}"
        _ITEMS[ref] = value
    return ref


def get(ref: str) -> Any:
    with _LOCK:
        try:
            return _ITEMS[ref]
        except KeyError:
            raise RuntimeError(f"hand-off {ref} is gone: tasks of one flow run must share a process") from None


def drop(ref: str) -> None:
    with _LOCK:
        _ITEMS.pop(ref, None)


def held() -> int:
    with _LOCK:
        return len(_ITEMS)
