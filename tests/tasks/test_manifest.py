"""The manifest's normalisation statistics, as the extraction flow writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from actcache.format import layout, moments
from actcache.read.reader import open_set

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _run(cfg) -> str:
    from actcache.flows.extract import extract_activations

    return extract_activations(cfg)[0]


def test_extraction_writes_the_merged_stats(extracted_set):
    s = open_set(extracted_set)
    m = s.manifest
    a = np.concatenate([sh.activations.reshape(-1, m["d"]).double().numpy() for sh in s])
    norms = np.sqrt((a * a).sum(axis=1))
    st = m["stats"]
    assert st["n"] == 448 and st["nan"] == st["inf"] == 0
    np.testing.assert_allclose(st["mean"], a.mean(axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(st["var"], a.var(axis=0), rtol=1e-6)
    assert st["mean_norm"] == pytest.approx(norms.mean(), rel=1e-6)
    assert st["mean_sq_norm"] == pytest.approx((norms**2).mean(), rel=1e-6)
    assert st["scale"] == pytest.approx(np.sqrt(32) / norms.mean(), rel=1e-6)
    # The vectors per shard stay in the records; the manifest carries the merged prefix of full shards only.
    assert all(moments.RECORD_FIELD not in r["extra"] for r in m["shards"])
    root = Path(extracted_set)
    assert all(
        moments.RECORD_FIELD in json.loads((root / layout.record_file(i)).read_text())["extra"] for i in range(4)
    )
    assert m["moments"]["prefix"]["shards"] == 3
    json.loads((root / layout.MANIFEST).read_text(), parse_constant=lambda c: pytest.fail(f"{c} in manifest"))


def test_an_extended_set_has_the_stats_of_one_run(base_config):
    small = _run(base_config.replace(max_tokens=320))  # shards of 4, 4, 2 sequences
    assert open_set(small).manifest["stats"]["n"] == 320
    extended = _run(base_config)  # the third shard grows, a fourth appears
    fresh = _run(base_config.replace(store=str(Path(base_config.store).parent / "fresh")))
    a, b = open_set(extended).manifest, open_set(fresh).manifest
    assert a["stats"]["n"] == 512
    assert json.dumps(a["stats"]) == json.dumps(b["stats"]) and a["moments"] == b["moments"]
