"""load_examples: every shard's header checked against the manifest and record; writable views, no warning."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from actcache.config import ExtractConfig
from actcache.errors import Failure
from actcache.extraction import examples
from actcache.extraction.plan import make_plan
from actcache.format import manifest, shard
from actcache.inputs import demo
from actcache.read.examples import load_examples
from actcache.sets.copy import copy_set
from actcache.storage.store import StoreRef

CONTEXT = 32
KINDS = [("none", "all"), ("zstd", "0,-1"), ("shuffle-zstd", "last")]


@pytest.fixture(scope="module")
def sets(tiny_models, tmp_path_factory) -> dict[str, str]:
    """One example set per codec (dims selected: the width is the selection's), with a string column."""
    root = tmp_path_factory.mktemp("load-examples")
    data = root / "rows.jsonl"
    lines = demo.corpus_lines()[:9]
    data.write_text(
        "\n".join(json.dumps({"text": " ".join(x.split()[:20]), "name": f"s{i}"}) for i, x in enumerate(lines))
    )
    out = {}
    for codec, positions in KINDS:
        cfg = ExtractConfig(
            model=str(tiny_models["gpt2"]),
            dataset=str(data),
            store=str(root / "store"),
            device="cpu",
            context_size=CONTEXT,
            max_tokens=1 << 12,
            shard_tokens=4 * CONTEXT,  # 3 shards, the last one short
            dtype="float32",
            codec=codec,
            packing="none",
            hook="blocks.0.hook_resid_post",
            dims="3:8",
            positions=positions,
            keep_columns="name",
        )
        (out[codec],) = examples.extract(make_plan(cfg))
    return out


@pytest.mark.parametrize("codec", [c for c, _ in KINDS])
def test_load_examples_warns_nothing(sets, codec):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The given buffer is not writable" was one (read-only bytes wrapped)
        got = load_examples(sets[codec])
    assert len(got) == 9 and got.columns["name"] == [f"s{i}" for i in range(9)]
    assert got.activations.shape[-1] == got.manifest["d"] == 5  # --dims 3:8


def test_load_examples_from_s3_warns_nothing_and_equals_local(sets, s3_server, s3_env):
    url = copy_set(sets["none"], s3_server.new_prefix()).url
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        remote = load_examples(url)
    local = load_examples(sets["none"])
    assert torch.equal(remote.activations, local.activations) and torch.equal(remote.tokens, local.tokens)


def _forge(url: str, tmp_path: Path, change) -> str:
    """A copy of set ``url`` whose shard 1 is re-encoded after ``change(tensors)``, its checksum and manifest
    updated to match (as a set someone hands you may be): only the header check can tell."""
    src = Path(url)
    dst = tmp_path / "store" / src.name
    shutil.copytree(src, dst)
    store = StoreRef.of(str(tmp_path / "store")).open()
    m = manifest.read(store, src.name)
    rec = m["shards"][1]
    t = {k: v.clone() for k, v in shard.decode((dst / rec["file"]).read_bytes(), codec=m["codec"]).items()}
    change(t)
    enc = shard.encode(t, codec=m["codec"])
    (dst / rec["file"]).write_bytes(enc.data)
    m["bytes"] += len(enc.data) - rec["bytes"]
    rec |= {"sha256": enc.sha256, "bytes": len(enc.data)}
    m.pop("_seal", None)
    manifest.write(store, src.name, m)
    return str(dst)


def _narrower(t):
    t["activations"] = t["activations"][..., :-1]


def _one_token_more(t):
    t["lengths"][0] += 1


def _forty_thousand_examples(t):  # each example is padded to the context: 40,000 x 32 x d values from a few KB
    t["lengths"] = torch.ones(40_000, dtype=t["lengths"].dtype)


def _fewer_examples(t):
    for k in ("lengths", "example_index", "column.name.offsets"):
        t[k] = t[k][:-1]


@pytest.mark.parametrize(
    "change,expected",
    [
        (_narrower, "shard tensor 'activations' is torch.float32[4, 1, 4], expected torch.float32[4, 1, 5]"),
        (_one_token_more, "its lengths add up to"),
        (_fewer_examples, "shard tensor 'lengths' is torch.int32[3], expected torch.int32[4]"),
        (_forty_thousand_examples, "shard tensor 'lengths' is torch.int32[40000], expected torch.int32[4]"),
    ],
    ids=["width", "lengths", "rows", "padding bomb"],
)
def test_a_shard_header_unlike_its_manifest_is_damage_in_one_line(sets, tmp_path, change, expected):
    forged = _forge(sets["shuffle-zstd"], tmp_path, change)
    with pytest.raises(Failure) as e:
        load_examples(forged)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("shard 1 of ") and "is damaged" in msg and expected in msg, msg


def _long_text(n_bytes: int):
    """A change for ``_forge``: the shard's first example's kept text made ``n_bytes`` longer (one run of "x", which
    zstd stores in a few KB)."""

    def change(t):
        utf8, offsets = t["column.name.utf8"], t["column.name.offsets"]
        t["column.name.utf8"] = torch.cat([torch.full((n_bytes,), ord("x"), dtype=torch.uint8), utf8])
        t["column.name.offsets"] = torch.cat([offsets[:1], offsets[1:] + n_bytes])

    return change


@pytest.mark.parametrize(
    "codec,n_bytes,expected",
    [
        ("none", 48 << 20, "claims .* stored bytes, more than a true shard of its key"),
        ("shuffle-zstd", 48 << 20, "inflates to .* more than a true shard of the set's key .*decompression bomb"),
        ("shuffle-zstd", 100 << 10, "column 'name' holds a value of 102402 bytes; a kept text holds 0 to 65536"),
    ],
    ids=["stored", "zstd bomb", "one long value"],
)
def test_a_kept_text_is_bounded_by_the_key_not_by_what_a_forged_shard_stores(sets, tmp_path, codec, n_bytes, expected):
    """A kept text column was bounded by the shard's stored size only (64 MiB free, or 32 times it; a plain shard not at
    all): a forged example set made load_examples and ActivationDataset(with_columns=True) allocate whatever its
    shard held. Now a kept text holds at most ``TEXT_VALUE_LIMIT`` bytes per example (extraction refuses more), so a
    shard's text is bounded by its key: refused in one line before it is read."""
    from actcache.read import example_rows
    from actcache.read.reader import open_set

    forged = _forge(sets[codec], tmp_path, _long_text(n_bytes))
    with pytest.raises(Failure, match=expected) as e:
        load_examples(forged)
    assert "\n" not in str(e.value) and "shard 1 of " in str(e.value)
    s = open_set(forged)  # what ActivationDataset(with_columns=True) reads each shard with
    with pytest.raises(Failure, match=expected):
        example_rows.read(s, s.records[1], example_rows.first_examples(s)[1], verify=True)


def test_extraction_refuses_a_kept_text_longer_than_readers_accept(make_config, tmp_path):
    from actcache.errors import ActcacheError

    data = tmp_path / "rows.jsonl"
    rows = [{"text": "a short text", "name": "s"}, {"text": "another text", "name": "y" * (shard.TEXT_VALUE_LIMIT + 1)}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = make_config(
        dataset=str(data),
        store=str(tmp_path / "store"),
        context_size=CONTEXT,
        packing="none",
        hook="blocks.0.hook_resid_post",
        keep_columns="name",
    )
    with pytest.raises(ActcacheError, match=r"column 'name' holds a text of 65537 bytes in dataset row 1; .*65536"):
        examples.extract(make_plan(cfg))
    assert not (tmp_path / "store").exists() or not [p for p in (tmp_path / "store").rglob("*.safetensors*")]
