"""Where batches go: the ``device`` argument checked, and batches copied there by a background thread, cast to
float32 and normalised there when that moves fewer bytes (see ``on_device_casts``)."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import torch

from actcache.errors import ActcacheError
from actcache.read.prefetch import background

CAST_ON = frozenset({"cuda"})
"""Device types whose batches leave the host as stored and are cast (and normalised) on the device."""

Norm = tuple[torch.Tensor, torch.Tensor | None]
Late = tuple[torch.dtype, Norm | None] | None


def on_device_casts(
    device: torch.device | None, stored: list[torch.dtype], wanted: list[torch.dtype], norms: list[Norm | None]
) -> list[Late]:
    """Per set, the cast and normalisation left to ``device`` (None: done on the host, as without a device).

    Float32 batches of float16/bfloat16 sets cross PCIe in half the bytes and skip the host's cast (about half of
    making a shuffled batch); the device then does the same float32 operations in the same order as the host
    (``BatchAssembly._convert``: cast, multiply, add), each rounded once, so the batches are bit for bit the same.
    Narrower batches stay cast on the host (fewer bytes to copy), where a one-rounding multiply-add decides the
    bits."""
    if device is None or device.type not in CAST_ON:
        return [None] * len(stored)
    return [
        (w, n) if w == torch.float32 and (s != w or n is not None) else None
        for s, w, n in zip(stored, wanted, norms, strict=True)
    ]


def _finish(t: torch.Tensor, late: tuple[torch.dtype, Norm | None]) -> torch.Tensor:
    """``t`` (on the device, as stored) in ``late``'s dtype, normalised: the host's own sequence of operations."""
    dtype, norm = late
    out = t.to(dtype)
    if norm is not None:
        factor, offset = norm
        out.mul_(factor)
        if offset is not None:
            out.add_(offset)
    return out


def _on_device(
    batches: Generator[Any, None, None], device: torch.device, late: list[Late] | None = None
) -> Iterator[Any]:
    """``batches`` made and copied to ``device`` by a background thread, two ahead. On CUDA the copies run on
    a stream of their own from pinned memory; each batch is handed over after an event says it has arrived.
    ``late``: per set (the batch's first tensors), the cast and normalisation done on the device after the copy."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    on = [None if x is None else (x[0], _norm_on(x[1], device)) for x in late or []]

    def to(t: Any, **kw: Any) -> Any:
        if isinstance(t, dict):  # the kept columns: tensors move, lists of strings stay
            return {k: to(v, **kw) for k, v in t.items()}
        return t.to(device, **kw) if isinstance(t, torch.Tensor) else t

    def moved_parts(parts: tuple[Any, ...], **kw: Any) -> tuple[Any, ...]:
        out = [to(t, **kw) for t in parts]
        for i, x in enumerate(on):
            if x is not None:
                out[i] = _finish(out[i], x)
        return tuple(out)

    def move(batch: Any) -> tuple[Any, Any]:
        single = isinstance(batch, torch.Tensor)
        parts = (batch,) if single else batch
        if stream is None:
            moved = moved_parts(parts)
            return (moved[0] if single else moved), None
        with torch.cuda.stream(stream):
            moved = moved_parts(parts, non_blocking=True)  # the casts run on the copy stream, after the copies
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


def _norm_on(norm: Norm | None, device: torch.device) -> Norm | None:
    if norm is None:
        return None
    factor, offset = norm
    return factor.to(device), None if offset is None else offset.to(device)


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ActcacheError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ActcacheError(f"device {device!r}: torch sees no CUDA device; use device='cpu' or leave it unset")
    return dev
