"""The flow end to end on a local store: reruns skip, extensions extend, damage is repaired."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from actcache.format import layout
from actcache.read.reader import open_set

pytestmark = pytest.mark.usefixtures("prefect_harness")


def run(cfg) -> tuple[list[str], Counter]:
    """Run the flow; return its set URLs and how many task runs of each kind the server recorded."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from actcache.flows.extract import extract_activations

    state = extract_activations(cfg, return_state=True)
    urls = state.result()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 60
        while True:  # task runs reach the server as events: wait until the last task is recorded
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            counts = Counter(r.name.rsplit("-", 1)[0] for r in runs if r.state and r.state.is_final())
            if counts["summarize"] == 1 or time.monotonic() > deadline:
                return urls, counts
            time.sleep(0.2)


def shard_bytes(url: str) -> dict[str, bytes]:
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("shards/*"))}


def test_second_run_computes_nothing(base_config):
    urls, counts = run(base_config)
    assert counts["extract"] == 4 and counts["upload"] == 4
    s = open_set(urls[0])
    assert len(s) == 4 and s.n_tokens == 512 and s.manifest["complete"]
    before = shard_bytes(urls[0])

    urls2, counts2 = run(base_config)
    assert urls2 == urls
    assert counts2["extract"] == 0 and counts2["compress"] == 0 and counts2["upload"] == 0
    assert counts2["skip-cached"] == 1
    assert shard_bytes(urls[0]) == before


def test_raising_max_tokens_computes_only_new_shards(base_config):
    small = base_config.replace(max_tokens=320)  # 10 sequences: shards of 4, 4, 2
    urls, counts = run(small)
    assert counts["extract"] == 3
    assert open_set(urls[0]).manifest["complete"] and open_set(urls[0]).n_tokens == 320
    first_two = {k: v for k, v in shard_bytes(urls[0]).items() if k < "shards/000002"}

    urls2, counts2 = run(base_config)  # 16 sequences: the partial third shard grows, a fourth appears
    assert urls2 == urls
    assert counts2["extract"] == 2
    after = shard_bytes(urls[0])
    assert {k: after[k] for k in first_two} == first_two
    assert open_set(urls[0]).n_tokens == 512

    full, _ = run(base_config.replace(store=str(Path(base_config.store).parent / "fresh")))
    assert shard_bytes(full[0]) == after, "an extended set equals one computed in a single run"


def test_deleted_and_corrupted_shards_are_recomputed(base_config):
    urls, _ = run(base_config)
    root = Path(urls[0])
    before = shard_bytes(urls[0])
    (root / layout.shard_file(1, "none")).unlink()
    victim = root / layout.shard_file(2, "none")
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    later = (root / layout.record_file(2)).stat().st_mtime_ns + 10**9  # after the completion record, as in life
    os.utime(victim, ns=(later, later))
    truncated = root / layout.shard_file(3, "none")
    truncated.write_bytes(truncated.read_bytes()[:100])

    problems = open_set(urls[0]).verify()
    assert len(problems) == 3 and all(f"shard {i}" in " ".join(problems) for i in (1, 2, 3))

    _, counts = run(base_config)
    assert counts["extract"] == 3
    assert shard_bytes(urls[0]) == before
    assert open_set(urls[0]).verify() == []


def test_another_hook_reuses_the_token_cache(base_config):
    urls, _ = run(base_config)
    tokens_dir = Path(base_config.store) / layout.TOKENS_ROOT
    stamps = {p: p.stat().st_mtime_ns for p in tokens_dir.rglob("*") if p.is_file()}
    urls2, counts = run(base_config.replace(hook="blocks.2.hook_mlp_out"))
    assert urls2 != urls and counts["extract"] == 4
    assert {p: p.stat().st_mtime_ns for p in tokens_dir.rglob("*") if p.is_file()} == stamps
    a, b = open_set(urls[0]), open_set(urls2[0])
    for sa, sb in zip(a, b, strict=True):
        assert (sa.tokens == sb.tokens).all()


def test_changed_setting_makes_a_new_set_and_leaves_the_old_one(base_config):
    urls, _ = run(base_config)
    before = {p: p.read_bytes() for p in Path(urls[0]).rglob("*") if p.is_file()}
    urls2, counts = run(base_config.replace(dtype="bfloat16"))
    assert urls2 != urls and counts["extract"] == 4
    assert {p: p.read_bytes() for p in Path(urls[0]).rglob("*") if p.is_file()} == before


def test_several_hooks_share_passes_and_skip_what_each_has(base_config):
    run(base_config)
    cfg = base_config.replace(hook="blocks.1.hook_resid_post,blocks.0.hook_mlp_out")
    urls, counts = run(cfg)
    assert len(urls) == 2
    assert counts["extract"] == 4  # one pass per shard for the hook still missing
    assert counts["upload"] == 4  # only the new hook's shards are written
    alone, _ = run(
        base_config.replace(hook="blocks.0.hook_mlp_out", store=str(Path(base_config.store).parent / "alone"))
    )
    assert shard_bytes(urls[1]) == shard_bytes(alone[0])


def test_shards_are_plain_safetensors_with_provenance(base_config):
    from safetensors import safe_open

    urls, _ = run(base_config.replace(codec="zstd", codec_level=3))
    m = open_set(urls[0]).manifest
    assert m["model"]["fingerprint"].startswith("local:") and m["hook"] == "blocks.1.hook_resid_post"
    assert m["layer"] == 1 and m["d"] == 32 and m["codec"] == "zstd"
    assert m["dataset"]["fingerprint"].startswith("files:") and m["tokenization"]["context_size"] == 32
    assert all({"index", "file", "n_tokens", "sha256", "bytes"} <= set(r) for r in m["shards"])
    assert all(r["extra"]["stats"]["nan"] == 0 and r["extra"]["stats"]["mean_l2_norm"] > 0 for r in m["shards"])
    assert "torch" in m["versions"] and "transformer-lens" in m["versions"]
    assert all(p.suffix == ".zst" for p in Path(urls[0]).glob("shards/*"))
    zstd_acts = [s.activations for s in open_set(urls[0])]

    urls, _ = run(base_config.replace(codec="shuffle-zstd", codec_level=3))
    assert open_set(urls[0]).manifest["codec"] == "shuffle-zstd"
    assert all(p.name.endswith(".safetensors.shuf.zst") for p in Path(urls[0]).glob("shards/*"))
    assert all(torch.equal(s.activations, a) for s, a in zip(open_set(urls[0]), zstd_acts, strict=True))
    assert open_set(urls[0]).verify() == []

    urls, _ = run(base_config)
    path = Path(urls[0]) / layout.shard_file(0, "none")
    with safe_open(str(path), "np") as f:  # no actcache code involved
        assert f.get_tensor("activations").shape == (4, 32, 32)
        assert str(f.get_tensor("activations").dtype) == "float16"
        assert f.get_tensor("tokens").dtype.name == "int32"
    assert not [p for p in Path(base_config.store).rglob("*") if ".tmp" in p.name]


@pytest.mark.subprocess
def test_a_run_shows_what_happened_through_the_api(base_config):
    """Set URLs in the final state, task runs named by shard, a log line per stored shard, artifacts keyed per
    set, progress at exactly 100% with two hooks, and `prefect artifact ls --all` still works."""
    import os
    import re
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL

    from actcache.flows.extract import extract_activations

    cfg = base_config.replace(hook="blocks.0.hook_resid_post,blocks.1.hook_resid_post")
    state = extract_activations(cfg, return_state=True)
    urls = state.result()
    run_id = state.state_details.flow_run_id
    set_ids = [Path(u).name for u in urls]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        assert run.state.is_completed() and run.state.message == f"2 sets: {urls[0]}, {urls[1]}"

        deadline = time.monotonic() + 60
        while True:  # task runs, logs and artifacts reach the server asynchronously (26 task runs with recheck)
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            arts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )
            stored = [m.message for m in logs if " stored: " in m.message]
            progress = [a for a in arts if a.type == "progress"]
            if (
                len(stored) == 8 and progress and progress[0].data == 100.0 and len(tasks) == 26
            ) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    names = Counter(t.name for t in tasks)
    shards = [f"{i:06d}" for i in range(4)]
    assert {f"extract-{i}" for i in shards} <= set(names)
    assert all(names[f"upload-{i}"] == 2 and names[f"compress-{i}"] == 2 for i in shards)  # one per hook

    for set_id in set_ids:  # "set <id> shard <index> stored: k/8 shards, <rate> tokens/s, ETA h:mm:ss"
        mine = [line for line in stored if line.startswith(f"set {set_id} shard ")]
        assert sorted(line.split()[3] for line in mine) == shards, stored
    assert all(
        re.fullmatch(r"set \w+ shard \d{6} stored: \d/8 shards, \d+ tokens/s, ETA \d+:\d\d:\d\d", line)
        for line in stored
    ), stored
    assert sorted(int(line.split()[5].split("/")[0]) for line in stored) == list(range(1, 9))

    keys = {a.key for a in arts}
    assert keys == {f"extraction-{set_ids[0]}", f"extraction-{set_ids[1]}", f"progress-{set_ids[0]}"}
    assert [a.data for a in progress] == [100.0]  # 2 hooks x 4 shards counted against 8, not 4

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "400"}  # no truncated keys
    listed = subprocess.run(
        [sys.executable, "-m", "prefect", "artifact", "ls"], env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert f"extraction-{set_ids[0]}" in listed.stdout
    # `ls --all` sorts by key and fails on two unkeyed artifacts. Prefect's server makes one (key and type
    # None) for each failed run's exception (other tests fail runs on this shared server); ours all have keys.
    with get_client(sync_client=True) as client:
        unkeyed = [a for a in client.read_artifacts() if a.key is None]
    assert all(a.type is None and a.flow_run_id != run_id for a in unkeyed), unkeyed
    if len(unkeyed) < 2:
        listed = subprocess.run(
            [sys.executable, "-m", "prefect", "artifact", "ls", "--all"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert listed.returncode == 0, listed.stderr[-2000:]


# -- issue 12: runs of one set with different --max-tokens ---------------------------------------------------
def store_files(root: Path) -> dict[str, bytes]:
    from setfiles import local_tree

    files = local_tree(root)
    for rel in [r for r in files if r.endswith(layout.MANIFEST)]:  # the target is the last writer's
        m = json.loads(files[rel])
        m.pop("target_tokens")
        files[rel] = json.dumps(m, sort_keys=True).encode()
    return files


def test_token_shards_do_not_depend_on_the_target(base_config):
    """Full token shards whatever --max-tokens asks (14 sequences: activation shards 4, 4, 4, 2; token shards
    4 x 4): a run asking more finds them done, and two targets write identical bytes."""
    parent = Path(base_config.store).parent
    run(base_config.replace(max_tokens=448, store=str(parent / "a")))
    run(base_config.replace(store=str(parent / "b")))
    tokens = [
        {
            str(p.relative_to(parent / s)): p.read_bytes()
            for p in (parent / s / layout.TOKENS_ROOT).rglob("*")
            if p.is_file() and p.name != "index.json"
        }
        for s in ("a", "b")
    ]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 8


def test_a_lower_max_tokens_never_shrinks_a_set(base_config):
    urls, _ = run(base_config)
    before = store_files(Path(base_config.store))
    urls2, counts = run(base_config.replace(max_tokens=448))  # its last shard would be 2 of the 4 sequences
    assert urls2 == urls and counts["extract"] == 0
    assert store_files(Path(base_config.store)) == before and open_set(urls[0]).n_tokens == 512


def test_a_shard_replaced_during_the_run_is_computed_again(base_config, tmp_path, monkeypatch):
    """The race two targets can run into, made to happen: right after this run records shard 3, a run asking
    448 tokens lands its partial shard 3 (bytes, then also its record). The run's recheck sees it and computes
    shard 3 again: the set ends as the larger target's, byte for byte."""
    from actcache.format import records

    small = tmp_path / "small"
    run(base_config.replace(max_tokens=448, store=str(small)))
    reference = tmp_path / "reference"
    run(base_config.replace(store=str(reference)))
    set_id = open_set(str(next(p for p in reference.iterdir() if not p.name.startswith("_")))).set_id
    real = records.write_record
    landed = []

    def write_record(store, root, record):
        real(store, root, record)
        if root == set_id and record.index == 3 and not landed:
            landed.append(record.index)
            for rel in (layout.shard_file(3, "none"), layout.record_file(3)):
                (Path(base_config.store) / set_id / rel).write_bytes((small / set_id / rel).read_bytes())

    monkeypatch.setattr(records, "write_record", write_record)
    urls, counts = run(base_config)
    assert landed and counts["extract"] == 5 and counts["recheck"] == 2  # shard 3 twice
    assert store_files(Path(base_config.store)) == store_files(reference)


def test_a_partial_shard_never_replaces_a_larger_one_in_place(base_config, tmp_path, monkeypatch):
    """The other order: a run asking 448 tokens is about to store its partial shard 3 when the full one (of a run
    asking 512) is already in place: it keeps the full one."""
    from actcache.format import records

    reference = tmp_path / "reference"
    run(base_config.replace(store=str(reference)))
    set_id = open_set(str(next(p for p in reference.iterdir() if not p.name.startswith("_")))).set_id
    real, planted = records.scan_set, []

    def scan_set(store, key, **kw):
        import inspect

        if any(f.function == "upload" for f in inspect.stack()[1:3]) and not planted:  # the upload's check
            planted.append(True)
            for rel in (layout.shard_file(3, "none"), layout.record_file(3)):
                dest = Path(base_config.store) / set_id / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes((reference / set_id / rel).read_bytes())
        return real(store, key, **kw)

    monkeypatch.setattr(records, "scan_set", scan_set)
    urls, counts = run(base_config.replace(max_tokens=448))
    assert planted
    s = open_set(urls[0])
    assert s.n_tokens == 512 and s.verify() == []
    assert (Path(urls[0]) / layout.shard_file(3, "none")).read_bytes() == (
        reference / set_id / layout.shard_file(3, "none")
    ).read_bytes()
