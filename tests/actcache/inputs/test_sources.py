from __future__ import annotations

import json

import pytest

from actcache.errors import ActcacheError
from actcache.inputs.sources import DatasetSpec, open_source

ROWS = [f"row number {i} with some text" for i in range(6)]


def _write_all(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(ROWS[:2]) + "\n\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": r, "n": 1}) for r in ROWS[2:4]))
    (tmp_path / "c.json").write_text(json.dumps({"data": [{"text": r} for r in ROWS[4:5]]}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ROWS[5:], "n": [1]}), tmp_path / "d.parquet")


def test_every_format_in_a_folder_in_order(tmp_path):
    _write_all(tmp_path)
    src = open_source(DatasetSpec(str(tmp_path)))
    assert list(src.texts()) == ROWS
    assert src.describe()["files"] == ["a.txt", "b.jsonl", "c.json", "d.parquet"]


def test_glob_and_single_file(tmp_path):
    _write_all(tmp_path)
    assert list(open_source(DatasetSpec(str(tmp_path / "*.jsonl"))).texts()) == ROWS[2:4]
    assert list(open_source(DatasetSpec(str(tmp_path / "a.txt"))).texts()) == ROWS[:2]


def test_fingerprint_follows_content_not_path(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.txt").write_text("hello\n")
    (tmp_path / "y.txt").write_text("hello\n")
    a = open_source(DatasetSpec(str(tmp_path / "x" / "a.txt"))).fingerprint
    assert open_source(DatasetSpec(str(tmp_path / "y.txt"))).fingerprint == a
    (tmp_path / "y.txt").write_text("hello!\n")
    assert open_source(DatasetSpec(str(tmp_path / "y.txt"))).fingerprint != a


@pytest.mark.parametrize(
    "make,column,message",
    [
        (lambda p: p / "missing.txt", "text", "not found"),
        (lambda p: (p / "e.txt").write_text("\n \n") and p / "e.txt", "text", "is empty"),
        (lambda p: (p / "r.jsonl").write_text('{"body": "x"}\n') and p / "r.jsonl", "text", "its columns are ['body']"),
        (lambda p: (p / "t.txt").write_text("x\n") and p / "t.txt", "content", "its columns are ['text']"),
        (lambda p: (p / "u.csv").write_text("x\n") and p / "u.csv", "text", "unsupported type"),
    ],
)
def test_bad_sources(tmp_path, make, column, message):
    with pytest.raises(ActcacheError, match=message.replace("[", r"\[").replace("]", r"\]")):
        open_source(DatasetSpec(str(make(tmp_path)), text_column=column)).check()


def test_hub_name_offline_is_a_clear_error():
    with pytest.raises(ActcacheError, match="not found locally nor on the HF hub"):
        open_source(DatasetSpec("no-such-user/no-such-dataset"))


@pytest.mark.parametrize("name", ["[draft] notes.txt", "a*b.txt", "what?.txt", "[x]*?.jsonl"])
def test_a_path_with_glob_characters_that_exists_is_that_file(tmp_path, name):
    """Not a glob: the file itself (a glob would match nothing, or other files)."""
    path = tmp_path / name
    path.write_text(json.dumps({"text": "literal"}) + "\n" if name.endswith(".jsonl") else "literal\n")
    (tmp_path / "other.txt").write_text("another file a glob could match\n")
    src = open_source(DatasetSpec(str(path)))
    assert list(src.texts()) == ["literal"] and src.describe()["files"] == [name]
    assert list(open_source(DatasetSpec(str(tmp_path / "*.txt"))).texts())  # a real glob still globs


@pytest.mark.parametrize("odd", ["link to /dev/zero", "FIFO", "broken link"])
def test_a_dataset_folder_holding_an_odd_file_is_refused_at_once(tmp_path, odd):
    """A device or FIFO in a dataset folder was hashed (and read) without end: the run hung. It is refused in one
    line naming the file; a link to a regular file (as the HF cache makes) is read through."""
    import os

    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "blob").write_text("three\n")
    (tmp_path / "c.txt").symlink_to(tmp_path / "blob")
    assert list(open_source(DatasetSpec(str(tmp_path / "*.txt"))).texts()) == ["one", "two", "three"]
    bad = tmp_path / "b.txt"
    if odd == "FIFO":
        os.mkfifo(bad)
    else:
        bad.symlink_to("/dev/zero" if odd == "link to /dev/zero" else tmp_path / "gone")
    with pytest.raises(ActcacheError, match=r"dataset file '.*b\.txt' is not a regular file"):
        open_source(DatasetSpec(str(tmp_path)))
