"""A safetensors header read and checked without torch: JSON, dtype codes and sizes.

``actcache verify`` checks every shard's header against what its manifest promises; with this module it does
so without importing torch (seconds of start-up). Decoding tensors (``actcache.format.shard``) uses the same checks.

``expect`` maps a tensor name to (dtype, shape or None); a dtype is a name (``"float16"``) or a torch dtype,
which needs no torch here: its ``str`` is ``torch.float16``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

HEADER_ALLOWANCE = 1 << 20
"""Bytes allowed for a safetensors header (names, shapes, offsets, metadata) on top of the tensor data."""

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
"""Bytes per element of each safetensors dtype code."""
_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "int64": "I64"}
"""The dtypes actcache stores ("rows" sets store positions as int64), by name."""

Expect = Mapping[str, tuple[Any, "tuple[int, ...] | None"]]


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def itemsize(dtype: Any) -> int:
    """Bytes per element of ``dtype`` (a name or a torch dtype)."""
    return ITEMSIZE[_CODES[_name(dtype)]]


def parse(data: bytes, head: bytes) -> dict:
    """The safetensors header of a file starting with ``head`` (its 8-byte length) and held in ``data``."""
    if len(head) < 8:
        raise ValueError(f"safetensors header too small (the file has {len(data)} bytes)")
    n = int.from_bytes(head[:8], "little")
    if n > HEADER_ALLOWANCE or 8 + n > len(data):
        raise ValueError(f"safetensors header too large ({n} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):
        raise ValueError("safetensors header is invalid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    return header


def check_entries(header: dict[str, Any], expect: Expect) -> int:
    """Check each tensor's dtype, shape and offsets against ``expect``; return the data bytes they fill."""
    names = sorted(k for k in header if k != "__metadata__")
    for name in expect:
        if name not in header:
            raise ValueError(f"shard has no tensor {name!r} (has {names})")
    if names != sorted(expect):
        raise ValueError(f"shard holds tensors {names}, expected {sorted(expect)}")
    spans = []
    for name, (dtype, shape) in expect.items():
        h = header[name]
        got: list[Any] = [h.get("dtype"), h.get("shape")] if isinstance(h, dict) else [None, None]
        if got != [_CODES.get(_name(dtype)), list(shape or [])]:
            prefix = str(dtype)[: len(str(dtype)) - len(_name(dtype))]  # "torch." where expect names torch dtypes
            named = {v: f"{prefix}{k}" for k, v in _CODES.items()}.get(got[0], got[0])
            raise ValueError(f"shard tensor {name!r} is {named}{got[1]}, expected {dtype}{list(shape or [])}")
        offsets = h.get("data_offsets")
        size = itemsize(dtype) * math.prod(shape or [])
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and offsets[1] - offsets[0] == size
            and offsets[0] >= 0
        ):
            raise ValueError(f"shard tensor {name!r} has data offsets {offsets!r} for {size} bytes")
        spans.append(offsets)
    spans.sort()
    if spans[0][0] != 0 or any(a[1] != b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise ValueError("shard tensors do not tile the data section")
    return spans[-1][1]


def read_exact(reader, n: int) -> bytes:
    """``n`` bytes from a stream (fewer only at its end)."""
    parts, got = [], 0
    while got < n:
        chunk = reader.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def check_provenance(header: dict, provenance: dict[str, str] | None) -> None:
    """Check that the actcache metadata a shard's header carries (set id, hook, index, when it has them) is
    ``provenance``: a shard copied in from another set, or from another index, is damage, whatever its checksum."""
    if not provenance:
        return
    meta = header.get("__metadata__")
    text = meta.get("actcache") if isinstance(meta, dict) else None
    if text is None:
        return  # no actcache metadata (token shards; sets older than it)
    try:
        fields = json.loads(text)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        raise ValueError("shard metadata is not actcache's")
    for name, want in provenance.items():
        if name in fields and fields[name] != want:
            raise ValueError(f"shard metadata names {name} {fields[name]!r}, not {want!r} (copied from elsewhere?)")


def check_header(data: bytes, *, codec: str, expect: Expect | None, provenance: dict[str, str] | None = None) -> None:
    """Check shard bytes' safetensors header against ``expect`` (tensors) and ``provenance`` (the metadata naming its
    set, hook and index; see ``check_provenance``) without decoding (or decompressing) the data."""
    if codec in ("zstd", "shuffle-zstd"):
        import zstandard

        try:
            with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False) as reader:
                head = read_exact(reader, 8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                head += read_exact(reader, min(n, HEADER_ALLOWANCE + 1))
        except zstandard.ZstdError as e:
            raise ValueError(f"not a valid zstd frame ({e})") from e
        data = head
    elif codec != "none":
        raise ValueError(f"unknown codec {codec!r}")
    header = parse(data, data[:8])
    check_provenance(header, provenance)
    if expect is not None:
        check_entries(header, expect)
