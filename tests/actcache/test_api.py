"""The Python API end to end: what `open_set` reads back is what the model computes."""

from __future__ import annotations

import pytest
import torch

import actcache
from actcache.inputs.model import ModelSpec, load_bridge, resolve_model

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_extract_then_open_set_equals_a_direct_forward_pass(base_config, tiny_models):
    url = actcache.extract(base_config, hook="blocks.2.hook_mlp_out", dtype="float32")
    s = actcache.open_set(url)
    assert s.manifest["hook"] == "blocks.2.hook_mlp_out" and len(s) == 4
    bridge = load_bridge(resolve_model(ModelSpec(str(tiny_models["gpt2"]))))
    seen = 0
    for shard in s:
        assert shard.activations.shape == (4, 32, 32) and shard.tokens.dtype == torch.int32
        assert (shard.tokens[:, 0] == 0).all(), "every sequence starts with BOS"
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(shard.tokens.long())
        torch.testing.assert_close(shard.activations, cache["blocks.2.hook_mlp_out"], rtol=0, atol=0)
        seen += shard.tokens.numel()
    assert seen == s.n_tokens == 512


def test_tokens_are_the_packed_corpus(base_config, corpus, tiny_models):
    from transformers import AutoTokenizer

    s = actcache.open_set(actcache.extract(base_config))
    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    stream = []
    for line in corpus.read_text().splitlines():
        if line.strip():
            stream += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) > 600:
            break
    flat = torch.cat([sh.tokens for sh in s]).reshape(-1, 32)[:, 1:].reshape(-1)
    assert flat.tolist() == stream[: len(flat)]


def test_a_target_far_beyond_the_data_costs_what_the_data_costs(base_config, tmp_path):
    """--max-tokens 10^18 on a few lines: the plan names ~10^16 shards until the data's end is known, and nothing
    lists them (it was a MemoryError); the answer counts the shards the data filled."""
    from actcache import api

    text = tmp_path / "few.txt"
    text.write_text("\n".join(f"line {i} of a short text that ends soon" for i in range(40)) + "\n")
    cfg = base_config.replace(dataset=str(text), max_tokens=10**18)
    [first] = api.extract_sets(cfg)
    s = actcache.open_set(first.url)
    assert first.complete and first.shards_skipped == 0 and first.shards_computed == first.n_shards == len(s) >= 2
    assert s.n_tokens == first.n_tokens == sum(sh.tokens.numel() for sh in s)
    [again] = api.extract_sets(cfg)
    assert (again.url, again.n_shards, again.shards_skipped, again.shards_computed) == (s.url, len(s), len(s), 0)

    # Where the data ends forgotten (every shard stored, the end record lost): the flow reads the data again and
    # the manifest it rewrites counts the shards the data filled, not 10^16. The partial last shard is computed
    # again (planned full, it did not count as done): the same bytes.
    from pathlib import Path

    from actcache.format import layout

    [end] = Path(cfg.store).glob(f"{layout.TOKENS_ROOT}/*/{layout.END}")
    end.unlink()
    [third] = api.extract_sets(cfg)
    partial = s.manifest["shards"][-1]["n_tokens"] < s.manifest["shard_tokens"]
    assert end.exists() and (third.n_shards, third.shards_computed, third.complete) == (len(s), int(partial), True)
    after = actcache.open_set(first.url).manifest
    assert after["target_tokens"] == s.n_tokens

    def shas(m):
        return [(r["index"], r["sha256"]) for r in m["shards"]]

    assert shas(after) == shas(s.manifest)


def test_bad_input_raises_before_prefect_runs(base_config):
    with pytest.raises(actcache.ActcacheError, match="unknown hook"):
        actcache.extract(base_config, hook="blocks.0.hook_nope")


def test_complete_sets_are_answered_from_the_store_alone(base_config, monkeypatch):
    """Without a Prefect API: a complete request starts no server and runs no flow, and answers what the flow did
    (the slow reference); a set whose manifest is missing still goes through the flow, which writes it."""
    from pathlib import Path

    from actcache import api
    from actcache.orchestration import tempserver

    cfg = base_config.replace(hook="blocks.0.hook_resid_post,blocks.1.hook_resid_post")
    by_flow = api.extract_sets(cfg)  # the harness's API is configured: the flow runs
    starts = []
    monkeypatch.setattr(tempserver, "api_configured", lambda: False)
    monkeypatch.setattr(tempserver, "start", lambda: starts.append(1))
    import actcache.flows.extract

    runs = []
    real = actcache.flows.extract.extract_activations
    monkeypatch.setattr(actcache.flows.extract, "extract_activations", lambda *a, **k: runs.append(1) or real(*a, **k))
    fast = api.extract_sets(cfg)
    assert starts == [] and runs == []
    assert [(s.url, s.n_tokens, s.bytes, s.complete) for s in fast] == [
        (s.url, s.n_tokens, s.bytes, s.complete) for s in by_flow
    ]
    assert [(s.shards_skipped, s.shards_computed) for s in fast] == [(4, 0), (4, 0)]

    (Path(fast[1].url) / "manifest.json").unlink()  # killed after its last shard, before its manifest
    again = api.extract_sets(cfg)
    assert starts == [1] and runs == [1] and (Path(fast[1].url) / "manifest.json").exists()
    assert [s.complete for s in again] == [True, True]


@pytest.mark.subprocess
def test_a_complete_set_imports_neither_torch_nor_prefect(base_config, tmp_path):
    """The CLI's answer for a complete set, in a process of its own with no Prefect API configured."""
    import json
    import os
    import subprocess
    import sys

    url = actcache.extract(base_config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONWARNINGS="ignore")
    code = (
        "import json, sys\nfrom actcache.cli import app as cli\nfrom actcache.orchestration import tempserver\n"
        f"code = cli.main({json.dumps(['extract', *_flags(base_config)])})\n"
        "print(json.dumps([code, tempserver._SERVER is not None, "
        "sorted(m for m in ('torch', 'prefect', 'transformers') if m in sys.modules)]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    *answer, report = p.stdout.strip().splitlines()
    assert answer == [url] and json.loads(report) == [0, False, []]


def _flags(cfg) -> list[str]:
    return [
        "--model",
        cfg.model,
        "--dataset",
        cfg.dataset,
        "--hook",
        cfg.hook,
        "--context-size",
        str(cfg.context_size),
        "--max-tokens",
        str(cfg.max_tokens),
        "--shard-tokens",
        str(cfg.shard_tokens),
        "--store",
        cfg.store,
        "--device",
        cfg.device,
    ]


def test_one_request_plans_once_and_lists_each_set_folder_a_bounded_number_of_times(base_config, monkeypatch):
    """The flow takes the plan the request made (the names are resolved once), and one extract lists the set's
    folder at most 6 times: the request's plan, the flow's recheck, the manifest, the check that every shard it names
    is still there just before it is written and again just after (``format.commit``: an ``rm`` that listed the set
    before the manifest existed leaves no manifest over missing shards), and the request's answer."""
    from actcache import api
    from actcache.extraction import plan as plan_mod
    from actcache.storage.store import Store

    resolved, listed = [], []
    real_resolve, real_listing = plan_mod.resolve, Store.listing
    monkeypatch.setattr(plan_mod, "resolve", lambda cfg, *a: resolved.append(cfg) or real_resolve(cfg, *a))
    monkeypatch.setattr(Store, "listing", lambda self, rel: listed.append(rel) or real_listing(self, rel))
    cfg = base_config.replace(max_tokens=448)  # a partial last shard: its upload looks before it writes
    [s] = api.extract_sets(cfg)
    assert (s.shards_computed, s.complete) == (4, True)
    assert len(resolved) == 1
    assert listed.count(s.set_id) <= 6
