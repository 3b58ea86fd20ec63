"""Where batches go: the ``device`` argument checked, and batches copied there by a background thread."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import torch

from actcache.errors import ActcacheError
from actcache.read.prefetch import background


def _on_device(batches: Generator[Any, None, None], device: torch.device) -> Iterator[Any]:
    """``batches`` made and copied to ``device`` by a background thread, two ahead. On CUDA the copies run on
    a stream of their own from pinned memory; each batch is handed over after an event says it has arrived."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def to(t: Any, **kw: Any) -> Any:
        if isinstance(t, dict):  # the kept columns: tensors move, lists of strings stay
            return {k: to(v, **kw) for k, v in t.items()}
        return t.to(device, **kw) if isinstance(t, torch.Tensor) else t

    def move(batch: Any) -> tuple[Any, Any]:
        single = isinstance(batch, torch.Tensor)
        parts = (batch,) if single else batch
        if stream is None:
            moved = tuple(to(t) for t in parts)
            return (moved[0] if single else moved), None
        with torch.cuda.stream(stream):
            moved = tuple(to(t, non_blocking=True) for t in parts)
            event = torch.cuda.Event()
            event.record(stream)
        return (moved[0] if single else moved), event

    def moved() -> Iterator[tuple[Any, Any]]:
        try:
            for batch in batches:
                yield move(batch)
        finally:
            batches.close()

    for batch, event in background(moved(), 2):
        if event is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(event)
            for t in (batch,) if isinstance(batch, torch.Tensor) else batch:
                for x in t.values() if isinstance(t, dict) else (t,):
                    if isinstance(x, torch.Tensor):
                        x.record_stream(current)  # the memory belongs to the copy stream: keep it until used here
        yield batch


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ActcacheError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ActcacheError(f"device {device!r}: torch sees no CUDA device; use device='cpu' or leave it unset")
    return dev
