"""Which token ids to leave out of a shuffle or an export, checked against the set's tokenizer.

The special ids come from ``manifest["tokenization"]``: ``bos_id`` and ``separator_id`` (every set), and
``eos_id``/``pad_id`` where the extraction recorded them; ``vocab_size``, where recorded, bounds explicit ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from actcache.errors import ActcacheError, opt

SPECIAL_FIELDS = ("bos_id", "eos_id", "pad_id", "separator_id")


def special_ids(tokenization: dict[str, Any]) -> tuple[int, ...]:
    """BOS, EOS, pad and separator ids the set's manifest records (absent or None ones skipped)."""
    return tuple(sorted({v for k in SPECIAL_FIELDS if type(v := tokenization.get(k)) is int}))


def parse_ids(text: str) -> list[int]:
    """``"50256,0"`` -> [50256, 0]; one line saying what is wrong otherwise."""
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ActcacheError(f"{opt('exclude_ids')} takes comma-separated token ids, got {text!r}") from None


def token_ids(manifest: dict[str, Any], *, special: bool = False, ids: Iterable[int] = (),
              option: str = "exclude_ids") -> tuple[int, ...]:
    """The sorted ids to exclude: the set's special tokens if ``special``, plus ``ids`` (each checked; errors
    name the field ``option``, where the ids came from)."""
    tokenization = manifest.get("tokenization") or {}
    vocab = tokenization.get("vocab_size")
    out = set(special_ids(tokenization)) if special else set()
    for i in ids:
        if type(i) is not int:
            raise ActcacheError(f"{opt(option)} takes integer token ids, got {i!r}")
        if i < 0 or (type(vocab) is int and i >= vocab):
            bound = f"0..{vocab - 1}" if type(vocab) is int else "non-negative"
            raise ActcacheError(f"token id {i!r} is outside the vocabulary of this set's tokenizer ({bound}); "
                                f"fix {opt(option)}")
        out.add(i)
    if special and not out:
        raise ActcacheError(f"this set's manifest records no special token ids; pass {opt(option)} instead")
    return tuple(sorted(out))
