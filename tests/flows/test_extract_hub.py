"""Hub model ids and hub datasets by name, end to end against the fake hub (tests/hub_server.py, at HF_ENDPOINT).

What users type most (``--model org/name``, ``--dataset org/name``) resolved once per plan and pinned: branches
that move mid-run, the hub unreachable, rate limits, and how many requests a run makes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

import actcache
from actcache import crashpoints
from actcache.errors import ActcacheError
from actcache.extraction.plan import make_plan

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _parquet(rows: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": rows}), buf)
    return buf.getvalue()


README = b"""---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*.parquet
  - split: test
    path: main/test-*.parquet
- config_name: other
  data_files: other/*.parquet
---
"""


def _doubled(path: Path) -> bytes:
    """The model's weights with the token embedding doubled: other activations, same shapes."""
    from safetensors.torch import load_file, save

    tensors = load_file(path / "model.safetensors")
    return save({k: v * 2 if k.endswith("wte.weight") else v for k, v in tensors.items()}, metadata={"format": "pt"})


@pytest.fixture
def repos(hub, tiny_models, corpus):
    """A model repo (main = the tiny GPT-2) and a dataset repo with two configs (train: the corpus's lines)."""
    lines = [t for t in corpus.read_text().splitlines() if t.strip()]
    model, data = hub.new_repo_id("tiny-gpt2"), hub.new_repo_id("texts")
    m_sha = hub.add_model(model, tiny_models["gpt2"])
    d_sha = hub.add_dataset(
        data,
        {
            "README.md": README,
            "main/train-0.parquet": _parquet(lines[:600]),
            "main/test-0.parquet": _parquet(lines[600:700]),
            "other/part.parquet": _parquet(lines[700:1300]),
        },
    )
    return {"model": model, "model_sha": m_sha, "data": data, "data_sha": d_sha, "lines": lines}


def _acts(url: str) -> list[torch.Tensor]:
    return [s.activations for s in actcache.open_set(url)]


def _tokens(url: str) -> list[torch.Tensor]:
    return [s.tokens for s in actcache.open_set(url)]


def test_model_by_hub_id_with_and_without_revision(base_config, repos, hub, tiny_models, tmp_path):
    repo, first = repos["model"], repos["model_sha"]
    second = hub.commit(repo, {"model.safetensors": _doubled(tiny_models["gpt2"])})
    latest = actcache.extract(base_config.replace(model=repo))
    pinned = actcache.extract(base_config.replace(model=repo, revision=first))
    local = actcache.extract(base_config.replace(store=str(tmp_path / "local")))  # the same weights as `first`
    m = actcache.open_set(latest).manifest["model"]
    assert (m["revision"], m["fingerprint"], m["name"]) == (second, f"hf:{second}", repo)
    assert actcache.open_set(pinned).manifest["model"]["revision"] == first
    assert all(torch.equal(a, b) for a, b in zip(_acts(pinned), _acts(local), strict=True))
    assert not torch.equal(_acts(latest)[0], _acts(pinned)[0])
    assert actcache.extract(base_config.replace(model=repo, revision="main")) == latest


def test_dataset_by_name_with_config_split_and_revision(base_config, repos, hub, tmp_path):
    data, first, lines = repos["data"], repos["data_sha"], repos["lines"]
    cfg = base_config.replace(dataset=data, dataset_config="main", split="train")  # streaming: the default
    url = actcache.extract(cfg)
    (tmp_path / "train.txt").write_text("\n".join(lines[:600]) + "\n")
    local = actcache.extract(base_config.replace(dataset=str(tmp_path / "train.txt"), store=str(tmp_path / "local")))
    assert all(torch.equal(a, b) for a, b in zip(_tokens(url), _tokens(local), strict=True))
    d = actcache.open_set(url).manifest["dataset"]
    assert (d["path"], d["config"], d["split"], d["revision"]) == (data, "main", "train", first)
    other = actcache.extract(cfg.replace(dataset_config="other"))
    assert other != url and not torch.equal(_tokens(other)[0], _tokens(url)[0])

    hub.commit(data, {"main/train-0.parquet": _parquet(lines[300:900])}, repo_type="dataset")  # main moves
    assert actcache.extract(cfg.replace(dataset_revision=first)) == url  # that commit: the same set, complete
    moved = actcache.extract(cfg)
    assert moved != url and actcache.open_set(moved).manifest["dataset"]["revision"] != first


def test_streaming_or_not_reads_the_same_tokens_into_the_same_set(base_config, repos, tmp_path):
    """Streaming is how the text is read, not what it is: both read the same tokens, under one set id."""
    cfg = base_config.replace(dataset=repos["data"], dataset_config="main", split="test")
    a = actcache.extract(cfg.replace(streaming=True, store=str(tmp_path / "a")))
    b = actcache.extract(cfg.replace(streaming=False, store=str(tmp_path / "b")))
    assert Path(a).name == Path(b).name and all(torch.equal(x, y) for x, y in zip(_tokens(a), _tokens(b), strict=True))


def test_a_branch_that_moves_mid_run_never_mixes_weights(base_config, repos, hub, tiny_models, tmp_path, monkeypatch):
    """main moves after the plan, then again between shards: the run completes with the planned commit's weights."""
    import actcache.api

    repo, first = repos["model"], repos["model_sha"]
    second = hub.commit(repo, {"model.safetensors": _doubled(tiny_models["gpt2"])}, branch="second")
    third = hub.commit(repo, {"README.md": b"moved again"}, branch="third")
    real_plan, real_point = actcache.api.make_plan, crashpoints.point

    def plan_then_move(cfg, **kw):
        plan = real_plan(cfg, **kw)
        hub.move_branch(repo, "main", second)  # after the plan, before any shard
        return plan

    def move_between_shards(name):
        if name == "extract.forward-done":
            hub.move_branch(repo, "main", third)
        real_point(name)

    with monkeypatch.context() as m:
        m.setattr(actcache.api, "make_plan", plan_then_move)
        m.setattr(crashpoints, "point", move_between_shards)
        url = actcache.extract(base_config.replace(model=repo))
    local = actcache.extract(base_config.replace(store=str(tmp_path / "local")))  # `first`'s weights
    s = actcache.open_set(url)
    assert s.manifest["model"]["revision"] == first and s.manifest["complete"] and s.verify() == []
    assert all(torch.equal(a, b) for a, b in zip(_acts(url), _acts(local), strict=True))
    rerun = actcache.extract(base_config.replace(model=repo))  # now main is `third`: its own set, the old one kept
    assert rerun != url and actcache.open_set(rerun).manifest["model"]["revision"] == third
    assert actcache.open_set(url).verify() == []


def test_partitions_get_the_commits_the_parent_resolved(base_config, repos, hub, tiny_models):
    from actcache.tasks.fanout import child_parameters

    cfg = base_config.replace(model=repos["model"], dataset=repos["data"], dataset_config="main")
    plan = make_plan(cfg, load_model=False)
    pinned = plan.pinned_config
    assert (pinned.revision, pinned.dataset_revision) == (repos["model_sha"], repos["data_sha"])
    assert child_parameters(pinned, 0, 2)["config"]["revision"] == repos["model_sha"]
    hub.commit(repos["model"], {"model.safetensors": _doubled(tiny_models["gpt2"])})
    hub.commit(repos["data"], {"main/train-0.parquet": _parquet(["moved"] * 50)}, repo_type="dataset")
    again = make_plan(pinned, load_model=False)
    assert [s.key for s in again.sets] == [s.key for s in plan.sets]
    assert again.resolved.model.pin == plan.resolved.model.pin  # typed as main or as its sha: loaded once
    assert [s.key for s in make_plan(cfg, load_model=False).sets] != [s.key for s in plan.sets]


class _CountedSleep:
    """The ``time`` module as huggingface_hub's HTTP backoff sees it, with its waits recorded instead of slept."""

    def __init__(self):
        import time

        self.time, self.waits = time, []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    def __getattr__(self, name: str):
        return getattr(self.time, name)


def test_hub_unreachable_without_a_cache_is_one_line_and_with_one_works(base_config, repos, hub, monkeypatch):
    """Offline with a cache, nothing retries: files are read from the commit's cached folder, never by hub id
    (by hub id, every tokenizer load lists the repo's chat templates and retries for ~23 s)."""
    cfg = base_config.replace(model=repos["model"], dataset=repos["data"], dataset_config="main")
    url = actcache.extract(cfg)  # online: downloads into this test's HF cache
    hub.stop()
    backoff = _CountedSleep()
    monkeypatch.setattr("huggingface_hub.utils._http.time", backoff)
    try:
        for name in (hub.new_repo_id("never-seen"),):
            with pytest.raises(ActcacheError) as e:
                make_plan(cfg.replace(model=name), load_model=False)
            msg = str(e.value)
            assert "not found" in msg and "did not answer" in msg and "\n" not in msg, msg
        assert actcache.extract(cfg) == url  # complete: recognised from the cache's commits, nothing read
        more = actcache.extract(cfg, hook="blocks.2.attn.hook_z")  # new work: weights from the cache by sha
        assert actcache.open_set(more).manifest["model"]["revision"] == repos["model_sha"]
        assert backoff.waits == [], "a client retried against the stopped hub"
    finally:
        hub.restart()


def test_a_429_is_answered_with_backoff(base_config, repos, hub, monkeypatch):
    from actcache.inputs import hub as hub_client

    waits: list[float] = []
    monkeypatch.setattr(hub_client, "_sleep", waits.append)
    hub.fail_next(rf"^/api/models/{repos['model']}", status=429, times=2, retry_after=3)
    hub.fail_next(rf"^/api/datasets/{repos['data']}", status=503, times=1, retry_after=None)
    plan = make_plan(
        base_config.replace(model=repos["model"], dataset=repos["data"], dataset_config="main"), load_model=False
    )
    assert plan.resolved.model.revision == repos["model_sha"]
    assert [r.status for r in hub.requests_matching(rf"^/api/models/{repos['model']}$")] == [429, 429, 200]
    assert [r.status for r in hub.requests_matching(rf"^/api/datasets/{repos['data']}$")][:2] == [503, 200]
    assert waits == [3.0, 3.0, 1.0]


def test_hub_requests_per_run_do_not_grow_with_shards(base_config, repos, hub, tmp_path):
    """The API's plan asks model and dataset info once each; the flow's plan (pinned shas) and the shards none."""
    cfg = base_config.replace(
        model=repos["model"],
        dataset=repos["data"],
        dataset_config="main",
        hook="blocks.1.hook_resid_post,blocks.2.attn.hook_z",
    )
    actcache.extract(cfg.replace(store=str(tmp_path / "warm"), max_tokens=256))  # downloads once per HF cache
    seen = {}
    for shards in (2, 6):
        hub.clear_requests()
        actcache.extract(cfg.replace(store=str(tmp_path / f"s{shards}"), max_tokens=128 * shards))
        # Streaming reads the data files over HTTP (ranged GETs, more for more text): that is reading, not resolving.
        seen[shards] = sorted(
            f"{r.method} {r.path}"
            for r in hub.requests
            if not (r.method == "GET" and "/resolve/" in r.path and "/datasets/" in r.path)
        )
    assert seen[2] == seen[6], json.dumps(seen, indent=1)
    assert seen[6].count(f"GET /api/models/{repos['model']}") == 1  # the API's plan; the flow's is pinned
    assert seen[6].count(f"GET /api/datasets/{repos['data']}") == 1
    assert not [r for r in seen[6] if "/resolve/" in r and "GET" in r], seen[6]  # the model's files: from the cache
    print(json.dumps(seen[6], indent=1))
