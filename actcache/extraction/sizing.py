"""How big a shard is, and whether the shards a run holds at once fit in this machine's memory.

The default shard size targets bytes (``--shard-bytes``), not tokens: a token of a 4096-wide hook weighs
5x one of a 768-wide hook, so a fixed token count makes wide models' shards (and the memory that holds them)
huge. Its sequences per shard go into the set's key (``TokensKey.seqs_per_shard``), so they are computed from
the hooks' widths as the plan resolves them without weights: a complete set is recognised without loading them.
"""

from __future__ import annotations

import contextlib
from typing import Any

from actcache.errors import ActcacheError, opt

IN_FLIGHT = 2
"""Shards compressed/uploaded while the next one is extracted (flows/extract.py): bounds memory to a few shards."""
HEADER_ROOM = 4096
"""Bytes kept for the safetensors header inside --shard-bytes, so a default shard never exceeds it."""
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_TOKEN_BYTES = 4  # int32 token ids stored beside the activations


def shard_file_bytes(n_seq: int, context: int, width: int, dtype: str) -> int:
    """Bytes of one shard file before the codec (activations + tokens; the header is under HEADER_ROOM)."""
    return n_seq * context * (width * _ITEMSIZE[dtype] + _TOKEN_BYTES)


def seqs_per_shard(cfg: Any, widths: list[int]) -> int:
    """Sequences per shard: ``shard_tokens`` if given, else as many as fit in ``shard_bytes`` for the widest
    requested hook (``widths``: values per token of each, as resolved without weights; several hooks share their
    token shards, so one size serves them all)."""
    if cfg.shard_tokens:
        return cfg.shard_tokens // cfg.context_size
    per_seq = shard_file_bytes(1, cfg.context_size, max(widths), cfg.dtype)
    return max(1, (cfg.shard_bytes - HEADER_ROOM) // per_seq)


def available_bytes() -> int | None:
    """Memory this process may still take: the system's MemAvailable, or less under a cgroup limit."""
    found = []
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    for limit, usage in (
        ("memory.max", "memory.current"),  # cgroup v2, then v1
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        with contextlib.suppress(OSError, ValueError):
            with open(f"/sys/fs/cgroup/{limit}") as f, open(f"/sys/fs/cgroup/{usage}") as g:
                cap = f.read().strip()
                if cap != "max" and int(cap) < 1 << 60:
                    found.append(int(cap) - int(g.read().strip()))
    return min(found) if found else None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(cfg: Any, n_seq: int, widths: list[int]) -> None:
    """Refuse, before anything is written or loaded, shards (of ``n_seq`` sequences, for hooks of these widths)
    that cannot all be held at once here.

    Per hook the process holds the shard being filled, and up to IN_FLIGHT shards being compressed or written;
    with a codec each of those may also hold its compressed copy.
    """
    available = available_bytes()
    if available is None:
        return
    one = sum(shard_file_bytes(n_seq, cfg.context_size, w, cfg.dtype) for w in widths)
    copies = 1 + IN_FLIGHT * (2 if cfg.codec != "none" else 1)
    need = one * copies
    if need > available:
        field = "shard_tokens" if cfg.shard_tokens else "shard_bytes"
        option = opt(field, cfg.shard_tokens or cfg.shard_bytes)
        raise ActcacheError(
            f"{option} needs up to {human(need)} of host memory for shards ({copies} x "
            f"{human(one)}: the one being filled and {IN_FLIGHT} being written"
            f"{', with their compressed copies' if cfg.codec != 'none' else ''}), but "
            f"{human(available)} is available; lower {opt(field)} or free memory"
        )
