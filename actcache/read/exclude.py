"""Which token ids to leave out of a shuffle or an export, checked against the set's tokenizer.

The special ids come from ``manifest["tokenization"]``: ``bos_id`` and ``separator_id`` (every set), and
``eos_id``/``pad_id`` where the extraction recorded them; ``vocab_size``, where recorded, bounds explicit ids.
"""

from __future__ import annotations

import operator
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


def token_ids(
    manifest: dict[str, Any], *, special: bool = False, ids: Any = (), option: str = "exclude_ids"
) -> tuple[int, ...]:
    """The sorted ids to exclude: the set's special tokens if ``special``, plus ``ids`` (each checked; errors
    name ``option``, where the ids came from). ``ids`` is anything integer-like a tokenizer or a tensor gives: an
    int, a numpy integer, a 0-d or 1-d integer numpy array or torch tensor, or a list (any iterable) of those."""
    tokenization = manifest.get("tokenization") or {}
    vocab = tokenization.get("vocab_size")
    out = set(special_ids(tokenization)) if special else set()
    for i in integers(ids, option):
        if i < 0 or (type(vocab) is int and i >= vocab):
            bound = f"0..{vocab - 1}" if type(vocab) is int else "non-negative"
            raise ActcacheError(
                f"token id {i!r} is outside the vocabulary of this set's tokenizer ({bound}); fix {opt(option)}"
            )
        out.add(i)
    if special and not out:
        raise ActcacheError(f"this set's manifest records no special token ids; pass {opt(option)} instead")
    return tuple(sorted(out))


def integers(ids: Any, option: str) -> list[int]:
    """``ids`` as Python ints, through ``operator.index`` (so floats, bools and strings are refused, not rounded or
    parsed); one line naming the field ``option`` and the offending value otherwise."""
    out: list[int] = []
    for v in _flat(ids, option, top=True):
        try:
            if isinstance(v, bool):  # an int to Python, a mask's value to a user
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise ActcacheError(
                f"{opt(option)} takes integer token ids (ints, or a 1-d integer numpy array or torch "
                f"tensor), got {_short(v)} of type {type(v).__name__}; pass ids such as "
                "[50256, 0]"
            ) from None
    return out


def _flat(ids: Any, option: str, *, top: bool) -> list[Any]:
    """The scalars of ``ids``: arrays and tensors (of at most one dimension) become Python scalars, an iterable
    other than text (at the top: a list, tuple, set, generator) is taken element by element, anything else is
    one value."""
    if hasattr(ids, "ndim") and hasattr(ids, "tolist"):  # numpy and torch, scalars and arrays alike
        if ids.ndim > 1:
            raise ActcacheError(
                f"{opt(option)} takes a flat list of token ids, got an array of shape "
                f"{tuple(ids.shape)}; flatten it first (e.g. ids.reshape(-1))"
            )
        ids = ids.tolist()
        return ids if isinstance(ids, list) else [ids]
    if top and isinstance(ids, Iterable) and not isinstance(ids, str | bytes | bytearray):
        return [x for v in ids for x in _flat(v, option, top=False)]
    return [ids]


def _short(v: Any) -> str:
    """A value's repr on one short line (a tensor's repr can span lines)."""
    text = " ".join(repr(v).split())
    return text if len(text) <= 60 else text[:57] + "..."
