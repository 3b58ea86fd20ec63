"""Lost workers and cancellation, end to end on a real Prefect server set up as README's "Deploying" says: the
pool, deployments/prefect.yaml, the lost-run automation (deployments/automations.py), one worker for the fan-out
parents (queue ``control``) and two extraction workers (queue ``default``, ``--limit 1``), as on GPU machines.

The second extraction worker's runs stall for good after their first shard (``ACTCACHE_FAULT=...:hang``, the one
thing these workers do not share with README): the kill below always lands in the middle of a partition.
Timings (detection, relaunch, the whole module) are printed with -s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect_server import Server, _signal, process_tree
from setfiles import local_tree

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[2]
POOL = "actcache"
PARTITIONS = 2
# `deployments/automations.py --lost-after`: two heartbeats of 30 s (prefect.yaml), the shortest it accepts.
LOST_AFTER_S = 60
# Generous bounds, not speed claims: what a loaded 2-core machine needs beyond the configured settings.
EVALUATION_SLACK_S = 45  # the server evaluates the automation every 5 s; heartbeat events travel asynchronously
RELAUNCH_BUDGET_S = 240  # a partition run from Scheduled to Completed: process start, imports, model, shards
STARTUP_BUDGET_S = 600  # a fan-out from its trigger to a partition mid-run: two runs' start-ups (busy machines)
STALL = "extract.forward-done:2:hang"
# A cancel: the parent asks its partitions to stop at its next poll (poll_s=1) or, at the latest, when its worker
# stops its process (SIGTERM); each partition's worker then stops that run's process: SIGTERM, which ends a forward
# pass where it is (the stalled one here too: see actcache.crashpoints), and SIGKILL only after Prefect's grace of
# 30 s. Issue 22: 30 s from the request to every run final.
CANCEL_ASKED_S = 25  # request -> every running partition Cancelling: the parent's poll or its SIGTERM
CANCEL_BOUND_S = 30  # request -> every run final
RESUME_BUDGET_S = 300  # a resumed fan-out, Scheduled to Completed: its start, tokens from the cache, 2 idle partitions


@pytest.fixture(scope="module")
def server_settings() -> dict[str, str]:
    # Automations run in the triggers service (the other deployment tests turn it off); subflows of a cancelled
    # parent are cancelled by the cancellation-cleanup service, every 20 s by default.
    return {
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS": "5",
    }


@dataclass
class Cluster:
    server: Server
    workers: dict[str, subprocess.Popen]
    common: dict
    root: Path


@pytest.fixture(scope="module")
def cluster(prefect_server, tiny_models, corpus, tmp_path_factory) -> Cluster:
    server = prefect_server
    root = tmp_path_factory.mktemp("lost-worker")
    model = tiny_models["gpt2"]
    server.wait_healthy()
    server.cli("work-pool", "create", POOL, "--type", "process", timeout=600)  # generous: CPUs may be shared
    server.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", timeout=600)
    # Issue 22: `deploy` alone installed both automations (no separate step), with prefect.yaml's windows.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.url}), client() as c:
        installed = {a.name: a for a in c.read_automations()}
    assert sorted(installed) == ["actcache-lost-fanouts", "actcache-lost-runs"], sorted(installed)
    assert installed["actcache-lost-runs"].trigger.within == timedelta(seconds=90)
    [resume] = installed["actcache-lost-fanouts"].actions
    assert resume.type == "run-deployment" and resume.deployment_id is not None
    # A shorter window than the deployed default, for a quicker test: the script updates the one automation.
    server.python("deployments/automations.py", "--lost-after", str(LOST_AFTER_S), timeout=600)
    env = {
        **server.env,
        "ACTCACHE_HOME": str(REPO),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
    }
    workers = {  # started outside the checkout: only the deployments' pull step brings a run there
        "control": server.start_worker("control", POOL, env, root, ("--work-queue", "control")),
        "gpu0": server.start_worker("gpu0", POOL, env, root, ("--work-queue", "default", "--limit", "1")),
        "gpu1": server.start_worker(
            "gpu1", POOL, {**env, "ACTCACHE_FAULT": STALL}, root, ("--work-queue", "default", "--limit", "1")
        ),
    }
    # 26 sequences of 32 tokens in shards of 4: 7 shards, the last one partial; partition 1 owns 1, 3 and 5.
    common = dict(
        model=str(model),
        hook="blocks.1.hook_resid_post",
        dataset=str(corpus),
        context_size=32,
        max_tokens=26 * 32,
        shard_tokens=4 * 32,
        batch_size=4,
        device="cpu",
    )
    return Cluster(server, workers, common, root)


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def wait_for(what: str, check, cluster: Cluster, timeout_s: float, every_s: float = 0.5, runs=None):
    """Poll ``check()`` until it returns something truthy; fail with the processes' logs after ``timeout_s``
    (and the states of ``runs()``, flow runs, when given)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every_s)
    states = "".join(
        f"\n{r.name}: {r.state.name} {r.labels.get('prefect.worker.name')} {r.state.message}"
        for r in (runs() if runs else [])
    )
    tails = "\n".join(f"--- {n}\n{cluster.server.procs.log_tail(n)}" for n, _ in cluster.server.procs.started)
    pytest.fail(f"{what}: not within {timeout_s} s{states}\n{tails}")


def partitions_of(c, parent_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return c.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
    )


def on_worker(runs, worker: str) -> list:
    return [r for r in runs if r.labels.get("prefect.worker.name") == worker]


def stalled_partition(c, parent_id, store: Path):
    """The partition run stalled on gpu1 once its first shard's record is written (nothing after it will be)."""
    for run in on_worker(partitions_of(c, parent_id), "gpu1"):
        index = int(run.name.split("-")[1])
        done = [int(p.stem) for p in store.glob("[!_]*/done/*.json")]
        if run.state.is_running() and any(i % PARTITIONS == index for i in done):
            return run, sorted(i for i in done if i % PARTITIONS == index)
    return None


def cli_extraction(cluster: Cluster, store: Path) -> subprocess.Popen:
    """``actcache extract`` of the module's options into ``store``, in its own process (a flow run here would tie
    this process's event sender to a server the module stops)."""
    options = cluster.common | {"store": str(store)}
    args = [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "actcache"), "extract", *args],
        env=cluster.server.env,
        cwd=cluster.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def set_folder(store: Path) -> Path:
    [folder] = [p for p in store.iterdir() if not p.name.startswith("_")]
    return folder


def finished(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


@dataclass
class QuietRun:
    """The undisturbed extraction every fan-out's set must equal byte for byte: started once, by the first test
    that needs it (while its fan-out runs), and shared by the module's tests."""

    cluster: Cluster
    store: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is None:
            self.proc = cli_extraction(self.cluster, self.store)

    def set_folder(self) -> Path:
        self.start()
        assert self.proc is not None
        if self.proc.returncode is None:
            finished(self.proc)
        return set_folder(self.store)


@pytest.fixture(scope="module")
def quiet(cluster) -> QuietRun:
    return QuietRun(cluster, cluster.root / "reference-store")


def unfinished_task_runs(c, flow_runs) -> list[str]:
    """The task runs not in a final state of those of ``flow_runs`` that have ended."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import TERMINAL_STATES, StateType

    ended = {r.id: r for r in flow_runs if r.state.is_final()}
    if not ended:
        return []
    tasks = c.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(ended))),
        task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(
                type=TaskRunFilterStateType(any_=[t for t in StateType if t not in TERMINAL_STATES])
            )
        ),
    )
    return [
        f"{t.name} {t.state.name} (flow run {ended[t.flow_run_id].name} {ended[t.flow_run_id].state.name})"
        for t in tasks
    ]


def fanout(cluster: Cluster, store: Path):
    from prefect.deployments import run_deployment

    params = {"config": cluster.common | {"store": str(store)}, "num_partitions": PARTITIONS, "poll_s": 1}
    return run_deployment("extract-fanout/fanout", parameters=params, timeout=0)


@pytest.fixture
def api(cluster):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: cluster.server.url}), client() as c:
        yield c


def test_cancelling_a_fanout_cancels_its_running_partitions(cluster, api, quiet):
    """Cancel a fan-out while a partition is mid-shard: every run is final within 30 s, nothing half-written is
    left, no task run stays Running, and a rerun completes the set byte-identical to a quiet run."""
    store = cluster.root / "cancelled-store"
    parent = fanout(cluster, store)
    run, _ = wait_for(
        "a partition running on gpu1 (stalled after its first shard)",
        lambda: stalled_partition(api, parent.id, store),
        cluster,
        timeout_s=STARTUP_BUDGET_S,
        runs=lambda: [api.read_flow_run(parent.id), *partitions_of(api, parent.id)],
    )

    t0 = time.monotonic()
    cluster.server.cli("flow-run", "cancel", str(parent.id))  # what a user does (or the UI's Cancel button)

    def all_final():
        runs = [api.read_flow_run(parent.id), *partitions_of(api, parent.id)]
        return runs if all(r.state.is_final() for r in runs) else None

    parent_run, *children = wait_for(
        "the fan-out and every partition final after the cancel",
        all_final,
        cluster,
        timeout_s=300,
        runs=lambda: partitions_of(api, parent.id),
    )
    # From the server's record of the request (the parent's Cancelling state; the CLI's own start-up before it is
    # no part of cancelling) to the last run's final state.
    [requested] = [s.timestamp for s in api.read_flow_run_states(parent.id) if s.name == "Cancelling"]
    cancel_s = (max(r.state.timestamp for r in (parent_run, *children)) - requested).total_seconds()
    print(
        f"lost-worker e2e: cancel -> all final in {cancel_s:.1f} s ({time.monotonic() - t0:.1f} s with the CLI)",
        flush=True,
    )
    for r in (parent_run, *children):  # where the time went: each run's states after the cancel
        steps = [(s.name, (s.timestamp - requested).total_seconds()) for s in api.read_flow_run_states(r.id)]
        print(f"  {r.name}: " + ", ".join(f"{n} {t:+.1f} s" for n, t in steps if t > -5), flush=True)
    asked_s = max(
        (s.timestamp - requested).total_seconds()
        for r in children
        for s in api.read_flow_run_states(r.id)
        if s.name == "Cancelling"
    )
    assert asked_s <= CANCEL_ASKED_S, f"the partitions were asked to stop {asked_s:.1f} s after the cancel"
    assert cancel_s <= CANCEL_BOUND_S, f"cancelling took {cancel_s:.1f} s"
    assert parent_run.state.name == "Cancelled"
    [stalled] = [r for r in children if r.id == run.id]
    assert stalled.state.name == "Cancelled", (stalled.state.name, stalled.state.message)
    assert all(r.state.name in ("Cancelled", "Completed") for r in children)
    assert cluster.workers["gpu1"].poll() is None  # the worker stays up and frees its slot for the next run
    # The stalled run ended its own way (SIGTERM: shards in flight stored whole, its task runs final), not killed.
    assert not unfinished_task_runs(api, [parent_run, *children]), unfinished_task_runs(api, [parent_run, *children])
    from actcache.format import layout

    assert not [p for p in store.rglob("*") if layout.parse_temp(p.name)]  # no write cut off half way

    quiet.start()
    rerun = cli_extraction(cluster, store)  # what a user does next: the same extraction again
    finished(rerun)
    assert local_tree(set_folder(store)) == local_tree(quiet.set_folder())  # byte for byte, without timestamps


def test_a_lost_node_is_detected_relaunched_and_the_set_completes(cluster, api, quiet):
    """SIGKILL gpu1's worker with its flow-run process mid-partition (a lost node) and the control worker alone."""
    t_start = time.monotonic()
    store = cluster.root / "fanout-store"
    quiet.start()
    parent = fanout(cluster, store)
    run, done_at_kill = wait_for(
        "a partition running on gpu1 (stalled after its first shard)",
        lambda: stalled_partition(api, parent.id, store),
        cluster,
        timeout_s=STARTUP_BUDGET_S,
        runs=lambda: [api.read_flow_run(parent.id), *partitions_of(api, parent.id)],
    )
    victim = int(run.name.split("-")[1])
    assert cluster.workers["gpu1"].poll() is None and cluster.workers["control"].poll() is None

    os.kill(cluster.workers["control"].pid, signal.SIGKILL)  # the worker alone: the parent keeps running
    _signal(process_tree(cluster.workers["gpu1"].pid), signal.SIGKILL)  # the node: worker and flow-run process
    killed_at = datetime.now(UTC)
    t_kill = time.monotonic()

    def parent_final():
        r = api.read_flow_run(parent.id)
        return r if r.state.is_final() else None

    parent_run = wait_for(
        "the fan-out final after the kill",
        parent_final,
        cluster,
        timeout_s=LOST_AFTER_S + EVALUATION_SLACK_S + RELAUNCH_BUDGET_S,
        runs=lambda: partitions_of(api, parent.id),
    )
    t_done = time.monotonic()
    assert parent_run.state.is_completed(), (parent_run.state.name, parent_run.state.message)
    assert str(store) in parent_run.state.message  # "1 set: <url>": the API and UI show where the set is
    assert "Crashed" not in [s.name for s in api.read_flow_run_states(parent.id)]  # its worker died, it did not

    children = {r.name: r for r in partitions_of(api, parent.id)}
    name = f"partition-{victim}-of-{PARTITIONS}"
    lost, again = children[name], children[f"{name}-attempt-2"]
    assert sorted(children) == sorted([f"partition-{i}-of-{PARTITIONS}" for i in range(PARTITIONS)] + [again.name])
    assert lost.state.name == "Crashed" and f"No heartbeat for {LOST_AFTER_S} s" in lost.state.message
    detected_s = (lost.state.timestamp - killed_at).total_seconds()
    assert 0 < detected_s <= LOST_AFTER_S + EVALUATION_SLACK_S
    assert again.state.is_completed() and again.labels.get("prefect.worker.name") == "gpu0"
    # Issue 22: the parent finalized what the lost run left unfinished: none of its task runs stays Running.
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    lost_tasks = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[lost.id])))
    assert lost_tasks and all(t.state.is_final() for t in lost_tasks), [(t.name, t.state.name) for t in lost_tasks]
    print(
        f"lost-worker e2e: lost run Crashed {detected_s:.1f} s after the kill (--lost-after {LOST_AFTER_S}); "
        f"fan-out done {t_done - t_kill:.1f} s after the kill",
        flush=True,
    )

    # The relaunch computed only what the lost run had not stored.
    def relaunch_tasks():
        runs = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again.id])))
        return runs if any(r.name.startswith("summarize") for r in runs) else None

    tasks = wait_for("the relaunch's task runs recorded", relaunch_tasks, cluster, timeout_s=60)
    owned = [i for i in range(7) if i % PARTITIONS == victim]
    assert sorted(int(r.name.split("-")[1]) for r in tasks if r.name.startswith("extract-")) == [
        i for i in owned if i not in done_at_kill
    ]

    ref_set, fan_set = quiet.set_folder(), set_folder(store)
    assert fan_set.name == ref_set.name
    assert local_tree(fan_set) == local_tree(ref_set)  # byte for byte, manifests without their timestamps

    # The job's summary for the set: a row per partition (the lost one with its relaunch) and one for all.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    [summary] = api.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"fanout-{fan_set.name}"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[parent.id]),
        )
    )
    rows = {r["partition"]: r for r in json.loads(summary.data)}
    assert rows[str(victim)]["runs"] == f"{name}, {name}-attempt-2" and rows[str(victim)]["state"] == "Completed"
    assert rows["all"]["shards"] == 7 and rows["all"]["missing_after"] == 0
    print(f"lost-worker e2e: whole test {time.monotonic() - t_start:.1f} s", flush=True)


def test_a_lost_fanout_parent_is_resumed_and_the_set_completes(cluster, api, quiet):
    """SIGKILL the worker running the fan-out parent with the parent's flow-run process (its node is lost): the
    lost-run automation marks the parent Crashed, the fanout deployment's trigger runs it again, and the set
    completes byte-identical to a quiet run, nothing computed twice."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

    server = cluster.server
    env = {**server.env, "ACTCACHE_HOME": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    # Extraction workers that do not stall (gpu1 stalls by design; the test before this one killed it).
    if cluster.workers["gpu1"].poll() is None:
        _signal(process_tree(cluster.workers["gpu1"].pid), signal.SIGKILL)
        cluster.workers["gpu1"].wait()
    gpu2 = server.start_worker("gpu2", POOL, env, cluster.root, ("--work-queue", "default", "--limit", "1"))
    # Two control workers besides any left: one runs the parent and dies, another takes the resumed run.
    spares = [server.start_worker(f"control-{n}", POOL, env, cluster.root, ("--work-queue", "control")) for n in "ab"]
    controls = {"control": cluster.workers["control"], "control-a": spares[0], "control-b": spares[1]}

    store = cluster.root / "resumed-store"
    quiet.start()
    parent = fanout(cluster, store)

    def mid_fanout():  # the parent running with both partitions launched, one of them running
        run, children = api.read_flow_run(parent.id), partitions_of(api, parent.id)
        if run.state.is_running() and len(children) == PARTITIONS and any(c.state.is_running() for c in children):
            return run
        return None

    parent_run = wait_for(
        "the fan-out running with its partitions launched",
        mid_fanout,
        cluster,
        timeout_s=STARTUP_BUDGET_S,
        runs=lambda: [api.read_flow_run(parent.id), *partitions_of(api, parent.id)],
    )
    worker = parent_run.labels.get("prefect.worker.name")
    assert worker in controls, worker
    _signal(process_tree(controls[worker].pid), signal.SIGKILL)  # the node: the worker and the parent's process
    killed_at = datetime.now(UTC)
    t_kill = time.monotonic()

    def resumed_done():
        runs = api.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["extract-fanout"])),
        )
        mine = [r for r in runs if r.id != parent.id and r.parameters.get("config", {}).get("store") == str(store)]
        return mine if mine and all(r.state.is_final() for r in mine) else None

    resumed_runs = wait_for(
        "the resumed fan-out final after the kill",
        resumed_done,
        cluster,
        timeout_s=LOST_AFTER_S + EVALUATION_SLACK_S + RESUME_BUDGET_S,
        runs=lambda: [api.read_flow_run(parent.id), *partitions_of(api, parent.id)],
    )
    t_done = time.monotonic()
    [resumed] = resumed_runs
    lost = api.read_flow_run(parent.id)
    assert lost.state.name == "Crashed" and f"No heartbeat for {LOST_AFTER_S} s" in lost.state.message
    detected_s = (lost.state.timestamp - killed_at).total_seconds()
    assert 0 < detected_s <= LOST_AFTER_S + EVALUATION_SLACK_S
    assert resumed.parameters["resumes"] == 1
    assert resumed.parameters["num_partitions"] == PARTITIONS and resumed.parameters["poll_s"] == 1
    assert resumed.state.is_completed(), (resumed.state.name, resumed.state.message)
    assert resumed.labels.get("prefect.worker.name") != worker
    assert str(store) in resumed.state.message
    print(
        f"lost-parent e2e: parent Crashed {detected_s:.1f} s after the kill (--lost-after {LOST_AFTER_S}); "
        f"resumed fan-out done {t_done - t_kill:.1f} s after the kill",
        flush=True,
    )

    # The lost parent's partitions ran on to the end. The resumed run launches a partition only where shards are
    # missing: none if they had finished, else one queued behind them that finds its shards stored. Either way
    # nothing is computed twice.
    first = partitions_of(api, parent.id)
    again = partitions_of(api, resumed.id)
    assert len(first) == PARTITIONS and all(r.state.is_completed() for r in first), [
        (r.name, r.state.name) for r in first
    ]
    assert {r.name for r in again} <= {r.name for r in first} and all(r.state.is_completed() for r in again)
    print(f"lost-parent e2e: the resumed fan-out launched {len(again)} partition runs", flush=True)
    resumed_tasks = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in again])))
    assert not [t.name for t in resumed_tasks if t.name.startswith("extract-")]

    ref_set, fan_set = quiet.set_folder(), set_folder(store)
    assert fan_set.name == ref_set.name
    assert local_tree(fan_set) == local_tree(ref_set)  # byte for byte, manifests without their timestamps
    assert gpu2.poll() is None
    # Issue 22: no task run is left Running after its flow run ended, here or in the tests before (the resumed run
    # finalized those of the lost parent, e.g. its wait-for-partitions).
    lost_tasks = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent.id])))
    assert [t for t in lost_tasks if t.name.startswith("wait-for-partitions") and t.state.name == "Crashed"], [
        (t.name, t.state.name) for t in lost_tasks
    ]
    assert not unfinished_task_runs(api, api.read_flow_runs()), unfinished_task_runs(api, api.read_flow_runs())
