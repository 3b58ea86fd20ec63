"""`--positions` parsed on its own: canonical text, rows per example and the positions picked, against Python's
own indexing of the example's positions."""

from __future__ import annotations

import pytest

from actcache.errors import ActcacheError
from actcache.extraction import positions

CTX = 16


@pytest.mark.parametrize("text", ["0", "-1", "0,-1", "-4:", "0:8", "-6:-2", "3,-4:,0:2", ":5", " 1 , -2 "])
def test_indices_are_pythons_indexing_of_the_example(text):
    p = positions.parse(text, CTX)
    assert positions.parse(p.text, CTX) == p  # the canonical spelling parses back to the same selection
    head, tail = p.reach()
    for length in range(max(head, tail, 1), CTX + 1):
        expected: list[int] = []
        for part in text.replace(" ", "").split(","):
            if ":" in part:
                a, b = (int(x) if x else None for x in part.split(":"))
                expected += list(range(length))[a:b]
            else:
                expected.append(list(range(length))[int(part)])
        assert p.indices(length, bos=False) == expected, (text, length)
        assert len(expected) == p.n_rows(CTX)  # every example stores the same number of rows


def test_named_kinds():
    assert positions.parse("all", CTX).n_rows(CTX) == CTX
    for kind in ("last", "first", "mean"):
        assert positions.parse(kind, CTX).n_rows(CTX) == 1 and positions.parse(kind, CTX).text == kind
    assert positions.parse("last", CTX).indices(5, bos=True) == [4]
    assert positions.parse("first", CTX).indices(5, bos=True) == [1]  # the example's own first token, not BOS
    assert positions.parse("first", CTX).indices(5, bos=False) == [0]


@pytest.mark.parametrize(
    "text,message",
    [
        ("lastt", "'lastt' is not a position"),
        ("16", "position 16 is out of range for .*context.size.? 16"),
        ("-17", "position -17 is out of range"),
        ("2:", "does not name a fixed number of positions"),
        ("-4:3", "does not name a fixed number of positions"),
        ("5:5", "is empty or out of range"),
        ("0:17", "is empty or out of range"),
        ("", "'' is not a position"),
    ],
)
def test_bad_positions_are_one_line(text, message):
    with pytest.raises(ActcacheError, match=message) as e:
        positions.parse(text, CTX)
    assert "\n" not in str(e.value)
