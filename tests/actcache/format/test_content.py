"""The content id: where the ids came from does not change it; everything else that changes the bytes does."""

from __future__ import annotations

import dataclasses

from actcache.format import content, layout
from actcache.format.key import SetKey, TokensKey


def _key(**tokens) -> SetKey:
    fields = dict(dataset="files:aa", tokenizer="tt", text_column="text", context_size=32, prepend_bos=True)
    t = TokensKey(**{**fields, "separator": 0, "seqs_per_shard": 8, "packing": "none", **tokens})
    return SetKey(t, "local:mm", "float32", "blocks.1.hook_resid_post", "float32", "none", 0, positions="last")


def test_the_input_fields_leave_the_content_id_and_the_rest_change_it():
    base = _key()
    same = _key(dataset="files:bb", tokenizer="other", text_column="body", token_column="input_ids", truncate="left")
    assert same.id != base.id and content.content_id(same, "d1") == content.content_id(base, "d1")
    assert content.content_id(base, "d2") != content.content_id(base, "d1")
    for change in (
        dict(tokens=dataclasses.replace(base.tokens, seqs_per_shard=9)),
        dict(tokens=dataclasses.replace(base.tokens, prepend_bos=False)),
        dict(hook="blocks.0.hook_resid_post"),
        dict(positions="first"),
        dict(dims="0:4"),
        dict(codec="zstd"),
        dict(model="local:nn"),
    ):
        assert content.content_id(dataclasses.replace(base, **change), "d1") != content.content_id(base, "d1"), change


def test_index_entries_are_store_files_and_nothing_else_there_is():
    cid = content.content_id(_key(), "d")
    assert cid.startswith("c") and layout.is_store_file(layout.content_entry(cid))
    assert not layout.is_store_file(f"{layout.CONTENT_ROOT}/notes.json")
    assert not layout.is_store_file(f"{layout.CONTENT_ROOT}/{cid}.json/x")
