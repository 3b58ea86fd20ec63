"""The stages as plain functions: run one by one, and all in order by ``run_sequential``, without Prefect."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from setfiles import local_tree

from actcache.extraction import handles, stages
from actcache.extraction.refs import ActivationsRef, PackedRef
from actcache.extraction.tokens import ShardWork
from actcache.format import layout, records
from actcache.read.reader import open_set


def test_each_stage_passes_small_references(base_config):
    cfg = base_config.replace(max_tokens=448)  # shards of 4, 4, 4 and 2 sequences
    plan = stages.plan(cfg)
    hook, set_id = "blocks.1.hook_resid_post", plan.sets[0].set_id
    assert stages.already_stored(plan) == stages.Stored(
        False, f"{hook}: 0 shards already stored, of up to 4 (where the dataset ends is not known yet)", {set_id: []}
    )
    work = stages.tokenize(plan)
    assert all(type(w) is ShardWork for w in work) and [w.n_seq for w in work] == [4, 4, 4, 2]
    stored = []
    for w in work:
        [acts] = stages.extract(plan, w)
        assert type(acts) is ActivationsRef and (acts.index, acts.n_seq) == (w.index, w.n_seq)
        packed = stages.compress(plan, acts)
        assert type(packed) is PackedRef and packed.extra["set_id"] == plan.sets[0].set_id
        stored.append(stages.upload(plan, packed))
        with pytest.raises(RuntimeError, match="is gone"):
            handles.get(packed.handle)  # the bytes were handed back once stored
    fresh, again = stages.recheck(plan, last=True)
    assert again == [] and len(fresh.sets[0].done) == 4
    [url] = stages.write_manifest(fresh)
    s = open_set(url)
    assert [r.sha256 for r in s.records] == [r.sha256 for r in stored] and s.n_tokens == 448
    assert stages.already_stored(stages.plan(cfg)) == stages.Stored(
        True, f"{hook}: 4 of 4 shards already stored", {set_id: [0, 1, 2, 3]}
    )


def test_a_partial_last_shard_never_replaces_a_larger_one(base_config):
    """A run with a lower target plans a partial last shard; a run with a higher one stores it whole meanwhile:
    the partial one is not written, and upload answers the larger shard's record."""
    low = stages.plan(base_config.replace(max_tokens=448))
    *_, last = stages.tokenize(low)
    assert last.n_seq == 2
    stages.run_sequential(base_config)  # the whole shard 3, 4 sequences
    set_id = low.sets[0].set_id
    shard_file = f"{set_id}/{layout.shard_file(3, low.sets[0].key.codec)}"
    before = low.store.read_bytes(shard_file)
    [acts] = stages.extract(low, last)
    record = stages.upload(low, stages.compress(low, acts))
    assert record.n_seq == 4 and low.store.read_bytes(shard_file) == before
    assert records.scan_set(low.store, low.sets[0].key).records[3].n_seq == 4


@pytest.mark.usefixtures("prefect_harness")
def test_run_sequential_writes_what_the_flow_writes(base_config, tmp_path):
    """Byte for byte (manifests without their timestamps), two hooks and a partial last shard."""
    from actcache.flows.extract import extract_activations

    cfg = base_config.replace(hook="blocks.0.hook_resid_post,blocks.1.hook_mlp_out", max_tokens=448)
    by_flow = cfg.replace(store=str(tmp_path / "flow"))
    by_stages = cfg.replace(store=str(tmp_path / "stages"))
    urls = stages.run_sequential(by_stages)
    assert [u.rsplit("/", 1)[1] for u in urls] == [u.rsplit("/", 1)[1] for u in extract_activations(by_flow)]
    flow_tree, stages_tree = local_tree(tmp_path / "flow"), local_tree(tmp_path / "stages")
    assert sum(rel.endswith(layout.MANIFEST) for rel in flow_tree) == 2
    assert stages_tree == flow_tree

    # A rerun has nothing to compute, and rewrites the manifests as they were.
    shutil.copytree(tmp_path / "stages", tmp_path / "again")
    assert stages.tokenize(stages.plan(cfg.replace(store=str(tmp_path / "again")))) == []
    stages.run_sequential(cfg.replace(store=str(tmp_path / "again")))
    assert local_tree(tmp_path / "again") == stages_tree


def test_write_manifest_leaves_an_unchanged_manifest_as_it_was(base_config, store):
    """Issue 22: a run that computed nothing does not rewrite manifest.json (its updated_at stays the first run's);
    one that adds shards does."""
    import time

    low = base_config.replace(max_tokens=256)
    [url] = stages.run_sequential(low)
    path = store / url.rsplit("/", 1)[1] / layout.MANIFEST
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    time.sleep(1.1)  # updated_at has whole seconds: a rewrite would change it
    stages.write_manifest(stages.plan(low))
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    stages.run_sequential(base_config)  # two more shards: a new manifest
    assert path.read_bytes() != before[0] and open_set(url).n_tokens == 512


@pytest.mark.usefixtures("prefect_harness")
def test_run_sequential_writes_what_the_flow_writes_for_one_example_per_sequence(base_config, tmp_path):
    """--packing none: the flow's examples stage and ``run_sequential`` write the same bytes (two hooks, a
    partial last shard), and the manifests say they hold examples."""
    from actcache.flows.extract import extract_activations

    cfg = base_config.replace(
        hook="blocks.0.hook_resid_post,blocks.1.hook_mlp_out", max_tokens=448, packing="none", positions="last"
    )
    by_flow = cfg.replace(store=str(tmp_path / "flow"))
    by_stages = cfg.replace(store=str(tmp_path / "stages"))
    urls = stages.run_sequential(by_stages)
    assert [u.rsplit("/", 1)[1] for u in urls] == [u.rsplit("/", 1)[1] for u in extract_activations(by_flow)]
    flow_tree, stages_tree = local_tree(tmp_path / "flow"), local_tree(tmp_path / "stages")
    manifests = [json.loads(data) for rel, data in stages_tree.items() if rel.endswith(layout.MANIFEST)]
    assert len(manifests) == 2 and all(m["examples"]["n_examples"] == 14 and m["complete"] for m in manifests)
    assert sorted(r.n_seq for r in open_set(urls[0]).records) == [2, 4, 4, 4]
    assert stages_tree == flow_tree


def test_a_requests_plan_is_taken_once_and_only_for_its_pinned_config(base_config, monkeypatch):
    made, planned = stages.plan(base_config), []
    real = stages.make_plan
    monkeypatch.setattr(stages, "make_plan", lambda cfg, **kw: planned.append(cfg) or real(cfg, **kw))
    pinned = made.pinned_config

    stages.remember(made)
    taken = stages.plan(pinned)  # as the flow asks for it
    assert planned == [] and taken.sets == made.sets and taken.config == pinned
    assert stages.plan(pinned).sets == made.sets and planned == [pinned]  # once only: then planned again

    stages.remember(made)
    assert stages.plan(pinned, 0, 2).partition == (0, 2) and len(planned) == 2  # another partition: its own plan
    assert stages.plan(pinned) is not None and len(planned) == 3  # and the request's plan was dropped

    stages.remember(made)
    stages.forget()  # the flow did not start
    stages.plan(pinned)
    assert len(planned) == 4


@pytest.mark.subprocess
def test_run_sequential_from_python_shows_no_library_bars(tmp_path):
    """The stages, called from Python as docs/stages.md shows, in a fresh process: transformers' "Loading weights"
    bar stays off for both engines (a residual hook: the bare HF model; an attention hook: the bridge), and a
    user's own setting of transformers' bars is given back."""
    import subprocess
    import sys

    code = (
        "from transformers.utils import logging as hf_logging\n"
        "from actcache import ExtractConfig\n"
        "from actcache.extraction.stages import run_sequential\n"
        "cfg = ExtractConfig(model='builtin:tiny-gpt2', hook='blocks.1.hook_resid_post,blocks.0.attn.hook_z',\n"
        "                    dataset='builtin:demo-corpus', max_tokens=1024, store='./activations')\n"
        "assert len(run_sequential(cfg)) == 2\n"
        "assert hf_logging.is_progress_bar_enabled()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Loading weights" not in run.stderr and "it/s]" not in run.stderr, run.stderr[-3000:]


def test_rm_refuses_a_set_while_its_extraction_runs(make_config, tmp_path, capsys, monkeypatch):
    """An extraction holds a writer lease on each set it writes (``storage.leases``) from its plan to its manifest:
    `rm` of the set meanwhile refuses in one line naming the process (before, it removed the shards written so far,
    and the run then wrote the rest and stopped at its manifest: half a set came back)."""
    import threading

    from actcache.cli.app import main

    cfg = make_config(store=str(tmp_path / "s"))
    first, go = threading.Event(), threading.Event()
    real = stages.upload

    def upload_then_wait(p, ref):
        out = real(p, ref)
        first.set()
        assert go.wait(120)
        return out

    monkeypatch.setattr(stages, "upload", upload_then_wait)
    done: list = []
    run = threading.Thread(target=lambda: done.append(stages.run_sequential(cfg)))
    run.start()
    try:
        assert first.wait(300)
        (url,) = [str(p) for p in (tmp_path / "s").iterdir() if not p.name.startswith("_")]
        code = main(["rm", url, "--yes"])
        err = capsys.readouterr().err
        assert code == 1 and f"is being written by process {os.getpid()} of this host" in err, err
    finally:
        go.set()
        run.join(300)
    assert done == [[url]] and open_set(url).n_tokens == 512
    assert not (Path(url) / "writers").exists(), "the lease goes when the run ends"
    assert main(["rm", url, "--yes"]) == 0 and not Path(url).exists()
