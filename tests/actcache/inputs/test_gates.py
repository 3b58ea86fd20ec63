"""Hooks TransformerLens keeps off: which flag opens each, which passes a request needs, and flags put back."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from actcache.inputs import gates


def test_the_gate_of_a_hook_follows_its_canonical_name():
    assert gates.gate("blocks.3.hook_mlp_in") == "use_hook_mlp_in"
    assert gates.gate("blocks.3.attn.hook_result") == "use_attn_result"
    for always_on in ("blocks.3.hook_mlp_out", "blocks.3.mlp.hook_in", "blocks.3.attn.hook_z", "hook_embed"):
        assert gates.gate(always_on) is None
    assert gates.COPIES.match("blocks.2.attn.hook_q_input") and gates.COPIES.match("blocks.2.hook_attn_in")


def test_a_flag_that_changes_the_computation_gets_a_pass_of_its_own():
    """use_attn_result changes how attention sums its heads: the hooks beside it run without it, so their bytes do
    not depend on what else was asked; use_hook_mlp_in only adds a copy and rides along in the plain pass."""
    same = {}.get
    hooks = [
        "blocks.1.attn.hook_result",
        "blocks.0.hook_mlp_in",
        "blocks.2.hook_resid_post",
        "blocks.0.attn.hook_result",
    ]
    assert gates.passes(hooks, lambda h: same(h, h)) == [
        (("use_hook_mlp_in",), ["blocks.0.hook_mlp_in", "blocks.2.hook_resid_post"]),
        (("use_attn_result",), ["blocks.1.attn.hook_result", "blocks.0.attn.hook_result"]),
    ]
    assert gates.passes(["blocks.2.hook_resid_post"], lambda h: h) == [((), ["blocks.2.hook_resid_post"])]
    # an alias is judged by the point it names, as the bridge judges it
    alias = {"blocks.0.mlp_entry": "blocks.0.hook_mlp_in"}
    assert gates.passes(["blocks.0.mlp_entry"], lambda h: alias.get(h, h)) == [
        (("use_hook_mlp_in",), ["blocks.0.mlp_entry"])
    ]


class _Bridge:
    def __init__(self):
        self.cfg = SimpleNamespace(use_attn_result=False, use_hook_mlp_in=True)
        self.calls: list[tuple[str, bool]] = []

    def set_use_attn_result(self, on: bool) -> None:
        self.calls.append(("use_attn_result", on))
        self.cfg.use_attn_result = on

    def set_use_hook_mlp_in(self, on: bool) -> None:
        self.calls.append(("use_hook_mlp_in", on))
        self.cfg.use_hook_mlp_in = on


def test_opened_puts_every_flag_back_as_it_was_even_on_an_error():
    b = _Bridge()
    with pytest.raises(RuntimeError), gates.opened(b, ["use_attn_result", "use_hook_mlp_in"]):
        assert b.cfg.use_attn_result and b.cfg.use_hook_mlp_in
        raise RuntimeError("the pass failed")
    assert (b.cfg.use_attn_result, b.cfg.use_hook_mlp_in) == (False, True)  # as before: the user's own setting kept
    assert b.calls == [("use_attn_result", True), ("use_attn_result", False)]
