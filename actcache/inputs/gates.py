"""Hooks that TransformerLens 4 keeps off unless a flag turns them on, and how a forward pass opens them.

The bridge refuses to attach to a gated hook point (``blocks.L.hook_mlp_in`` needs ``use_hook_mlp_in``,
``blocks.L.attn.hook_result`` needs ``use_attn_result``), and a sweep over every hook skips them. Their names are
the ones TransformerLens 3 users know (a transcoder's input, each head's output), so extraction turns the flag on
for the pass that needs it. The gate of a hook follows the bridge's own rule: the suffix of its hook point's
canonical name.

A flag that only adds a hook point on a copy (``use_hook_mlp_in``: the values are ``hook_resid_mid``'s, bit for
bit) may be on in any pass. One that changes how the model computes (``use_attn_result``: each head's output is
projected apart, then summed) gets a pass of its own, so every other hook keeps the bytes of the plain forward
pass: a set's bytes stay a function of its key, whatever else was extracted beside it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

GATES: tuple[tuple[str, re.Pattern[str], bool], ...] = (
    # (the bridge's flag, the canonical hook point names it gates, whether turning it on leaves values alone)
    ("use_hook_mlp_in", re.compile(r"mlp_in\Z"), True),
    ("use_attn_result", re.compile(r"attn\.hook_result\Z"), False),
)

COPIES = re.compile(r"^blocks\.(\d+)\.(?:attn\.)?(hook_q_input|hook_k_input|hook_v_input|hook_attn_in)\Z")
"""Gated hooks not opened: one copy per head of the block's input (``hook_resid_pre``), the same vector n_heads
times; extract ``hook_resid_pre`` instead."""


def gate(point: str) -> str | None:
    """The flag that turns on the hook point named ``point`` (its canonical name), or None if it is always on."""
    for flag, names, _ in GATES:
        if names.search(point):
            return flag
    return None


def passes(hooks: Sequence[str], canonical: Callable[[str], str]) -> list[tuple[tuple[str, ...], list[str]]]:
    """``hooks`` split into forward passes, each with the flags it runs with: one pass per flag that changes the
    computation (none first), the flags that leave values alone on in whichever pass holds their hooks."""
    changing = {flag: not neutral for flag, _, neutral in GATES}
    gated = {h: gate(canonical(h)) for h in hooks}
    groups: dict[str | None, list[str]] = {}
    for h, flag in gated.items():
        groups.setdefault(flag if flag is not None and changing[flag] else None, []).append(h)
    return [
        (tuple(sorted({f for h in groups[key] if (f := gated[h]) is not None})), groups[key])
        for key in sorted(groups, key=lambda k: (k is not None, k or ""))
    ]


def canonical_of(bridge: Any) -> Callable[[str], str]:
    """A hook name's canonical hook point name on ``bridge`` (an alias names the point it shares)."""
    points = bridge.hook_dict

    def canonical(name: str) -> str:
        point = points.get(name)
        return getattr(point, "name", None) or name

    return canonical


@contextlib.contextmanager
def opened(bridge: Any, flags: Sequence[str]) -> Iterator[None]:
    """``bridge`` with ``flags`` on (its ``set_<flag>`` setters), each put back as it was afterwards."""
    before = {f: bool(getattr(bridge.cfg, f, False)) for f in flags}
    try:
        for f in flags:
            if not before[f]:
                getattr(bridge, f"set_{f}")(True)
        yield
    finally:
        for f, was in before.items():
            if bool(getattr(bridge.cfg, f, False)) != was:
                getattr(bridge, f"set_{f}")(was)
