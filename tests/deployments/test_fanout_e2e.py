"""End to end on a real Prefect server: deploy deployments/prefect.yaml, two process workers, a 4-way fan-out.

The fan-out's set must equal a single-process run byte for byte, every shard computed exactly once, and a
second trigger must compute nothing. Measured wall time: see the report printed at the end (-s).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
PARTITIONS = 4
RUN_TIMEOUT_S = 240


def deployment_spec(name: str) -> dict:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    return next(d for d in spec["deployments"] if d["name"] == name)


def set_files(set_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(set_dir)): p.read_bytes() for p in sorted(set_dir.rglob("*")) if p.is_file()}


def wait_final(client, run_id, server, timeout_s: float = RUN_TIMEOUT_S):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(0.5)
    tails = "\n".join(f"--- {n}\n{server.procs.log_tail(n)}" for n, _ in server.procs.started)
    pytest.fail(f"flow run {run_id} not final after {timeout_s} s:\n{tails}")


def task_runs_named(client, flow_run_ids, name: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    if not flow_run_ids:
        return []
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids))))
    return [r for r in runs if re.fullmatch(rf"{re.escape(name)}-\w+", r.name)]


def runs_of(client, deployment_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
    )


def max_overlap(runs) -> int:
    events = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs], key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def test_fanout_on_real_server_with_two_workers(prefect_server, tiny_models, corpus, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from actcache.read.reader import open_set

    timings: dict[str, float] = {}
    t0 = t = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        timings[name] = round(now - t, 1)
        print(f"e2e: {name}: {timings[name]} s", flush=True)
        t = now

    server = prefect_server
    pool = deployment_spec("partition")["work_pool"]["name"]
    model = tiny_models["gpt2"]
    server.wait_healthy()
    lap("server")

    server.cli("work-pool", "create", pool, "--type", "process")
    workers_env = {
        **server.env,
        "ACTCACHE_HOME": str(REPO),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
    }
    for i in (1, 2):
        # Started outside the checkout: only the deployment's pull step brings a run there.
        server.start_worker(f"worker{i}", pool, workers_env, cwd=tmp_path)
    server.cli("--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML.relative_to(REPO)))
    lap("pool+workers+deploy")

    # 34 sequences of 32 tokens: 9 shards, the last one partial; partition 0 owns 0, 4 and 8.
    common = dict(
        model=str(model),
        hook="blocks.1.hook_resid_post",
        dataset=str(corpus),
        context_size=32,
        max_tokens=34 * 32,
        shard_tokens=4 * 32,
        batch_size=4,
        device="cpu",
    )
    fan_store, ref_store = tmp_path / "fanout-store", tmp_path / "single-store"
    n_shards = 9

    with temporary_settings(updates={PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("extract-activations/nightly")
        assert [s.schedule.cron for s in nightly.schedules] == [deployment_spec("nightly")["schedules"][0]["cron"]]
        assert all(s.active for s in nightly.schedules)
        # The flow's typed signature is the deployment's parameter schema: a bad option never reaches a worker.
        on_demand = client.read_deployment_by_name("extract-activations/extract")
        for bad in ({"dtype": "float8"}, {"max_token": 4096}):  # a bad choice, a typo
            with pytest.raises(Exception, match="float8|max_token"):
                client.create_flow_run_from_deployment(on_demand.id, parameters={"config": bad})

        fanout_params = {"config": common | {"store": str(fan_store)}, "num_partitions": PARTITIONS, "poll_s": 1}
        first = run_deployment("extract-fanout/fanout", parameters=fanout_params, timeout=0)
        # The single-process reference: one run of the on-demand deployment, on a worker too. (Not in this
        # process: a flow run here would leave Prefect's event sender bound to a server that is about to stop.)
        ref_params = {"config": common | {"store": str(ref_store)}}
        single = run_deployment("extract-activations/extract", parameters=ref_params, timeout=0)
        single = wait_final(client, single.id, server)
        assert single.state.is_completed(), f"single run ended {single.state.name}: {single.state.message}"
        lap("single-process run")

        first = wait_final(client, first.id, server)
        assert first.state.is_completed(), f"fan-out ended {first.state.name}: {first.state.message}"
        lap("fan-out (4 partitions)")

        partition_dep = client.read_deployment_by_name("extract-activations/partition")
        children = runs_of(client, partition_dep.id)
        assert sorted(r.name for r in children) == [f"partition-{i}-of-{PARTITIONS}" for i in range(PARTITIONS)]
        assert all(r.state.is_completed() for r in children)
        for r in sorted(children, key=lambda r: r.name):  # where the time goes (shown with -s)
            marks = [
                (st.name, round((st.timestamp - first.created).total_seconds(), 1))
                for st in client.read_flow_run_states(r.id)
            ]
            print(f"e2e: {r.name}: {[m for m in marks if m[0] != 'AwaitingConcurrencySlot']}", flush=True)
        limit = deployment_spec("partition")["concurrency_limit"]["limit"]
        assert max_overlap(children) <= limit, "the deployment concurrency limit from prefect.yaml was not enforced"

        # Every shard computed exactly once, across all partitions (task runs are recorded asynchronously).
        child_ids = [r.id for r in children]
        deadline = time.monotonic() + 30
        while len(task_runs_named(client, child_ids, "extract")) < n_shards and time.monotonic() < deadline:
            time.sleep(0.5)
        extracts = task_runs_named(client, child_ids, "extract")
        assert len(extracts) == n_shards and all(r.state.is_completed() for r in extracts)

        second = run_deployment("extract-fanout/fanout", parameters=fanout_params, timeout=0)
        second = wait_final(client, second.id, server)
        assert second.state.is_completed(), f"second fan-out ended {second.state.name}: {second.state.message}"
        deadline = time.monotonic() + 30
        while not task_runs_named(client, [second.id], "verify-sets") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert task_runs_named(client, [second.id], "verify-sets"), "the second run's task runs were never recorded"
        assert len(runs_of(client, partition_dep.id)) == PARTITIONS, "the second trigger launched partitions"
        assert task_runs_named(client, [second.id], "extract") == []
        # Extract task runs on the whole server: the single-process run's and the first fan-out's, no more.
        everything = [r.id for r in client.read_flow_runs()]
        assert len(task_runs_named(client, everything, "extract")) == 2 * n_shards
        lap("second fan-out")

    # The fan-out's set is the single-process set (same key, so same id), byte for byte.
    [ref_set] = [p for p in ref_store.iterdir() if not p.name.startswith("_")]
    [fan_set] = [p for p in fan_store.iterdir() if not p.name.startswith("_")]
    assert fan_set.name == ref_set.name
    ref_files, fan_files = set_files(ref_set), set_files(fan_set)
    shard_names = [f"shards/{i:06d}.safetensors" for i in range(n_shards)]
    assert sorted(k for k in fan_files if k.startswith("shards/")) == shard_names
    assert sorted(k for k in fan_files if k.startswith("done/")) == [f"done/{i:06d}.json" for i in range(n_shards)]
    assert sorted(fan_files) == sorted(ref_files)
    for name in fan_files:
        if name != "manifest.json":
            assert fan_files[name] == ref_files[name], f"{name} differs from the single-process run"
    import json

    # The seal (json_sha256) covers the timestamps too: it differs whenever they do.
    strip = lambda m: {k: v for k, v in m.items() if k not in ("created_at", "updated_at", "json_sha256")}  # noqa: E731
    fan_manifest = json.loads(fan_files["manifest.json"])
    assert strip(fan_manifest) == strip(json.loads(ref_files["manifest.json"]))
    assert fan_manifest["complete"] and fan_manifest["n_shards"] == n_shards
    assert open_set(str(fan_set)).verify() == []
    lap("compare")
    timings["total"] = round(time.monotonic() - t0, 1)
    print("e2e timings (s):", timings)
