"""load_examples: a whole example set in memory, never more than its records and its key say."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from actcache.config import ExtractConfig
from actcache.errors import ActcacheError
from actcache.extraction import examples
from actcache.extraction.plan import make_plan
from actcache.format import layout, records, shard
from actcache.inputs import demo
from actcache.read.examples import load_examples


@pytest.fixture(scope="module")
def example_set(tiny_models, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("examples")
    data = folder / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"text": line}) for line in demo.corpus_lines()[:12]) + "\n")
    cfg = ExtractConfig(
        model=str(tiny_models["gpt2"]),
        dataset=str(data),
        store=str(folder / "store"),
        device="cpu",
        context_size=16,
        max_tokens=1 << 10,
        shard_tokens=4 * 16,
        dtype="float16",
        codec="zstd",
        packing="none",
        hook="blocks.1.hook_resid_post",
    )
    (url,) = examples.extract(make_plan(cfg))
    return url


def test_a_shard_claiming_more_examples_than_its_record_is_refused_before_padding(example_set, tmp_path):
    """Each example is padded to the context: a shard whose ``lengths`` (resealed, valid zstd) lists 40,000
    examples would make load_examples allocate 40,000 x 16 x 32 values from a few KB. It names the shard."""
    import shutil
    from pathlib import Path

    set_dir = tmp_path / "store" / Path(example_set).name
    shutil.copytree(example_set, set_dir)
    assert load_examples(str(set_dir)).activations.shape[1:] == (16, 32)
    m = json.loads((set_dir / layout.MANIFEST).read_text())
    rec = m["shards"][0]
    t = dict(shard.decode((set_dir / rec["file"]).read_bytes(), codec="zstd"))
    t["lengths"] = torch.ones(40_000, dtype=t["lengths"].dtype)
    data = shard.encode(t, codec="zstd").data
    (set_dir / rec["file"]).write_bytes(data)
    rec.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    m["bytes"] = sum(r["bytes"] for r in m["shards"])
    (set_dir / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))
    (set_dir / layout.record_file(0)).write_text(json.dumps(records.sealed(rec)))
    with pytest.raises(ActcacheError, match=r"^shard 0 of .* holds other rows than its record; rerun the extraction"):
        load_examples(str(set_dir))
