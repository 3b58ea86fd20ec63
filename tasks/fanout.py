"""Fan one extraction out over partitions, each a flow run of a deployment on a work pool.

The parent never loads the model: it plans from listings, tokenizes once (so partitions only read the
token cache and never write the same file), launches one child run per partition that owns missing
shards, waits, then consolidates and verifies. How many children run at once is Prefect's business
(deployment concurrency limit, work pool limit, worker ``--limit``), not ours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelling

from actcache.config import ExtractConfig
from actcache.errors import ActcacheError
from actcache.extraction.plan import Plan, make_plan
from actcache.orchestration.cancel import record_cancelled
from actcache.read.reader import open_set

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun


def partitions_with_work(plan: Plan, num_partitions: int) -> list[int]:
    """The partitions that own at least one missing shard (ownership is ``Plan.owns``, nowhere else)."""
    if num_partitions < 1:
        raise ActcacheError(f"num_partitions must be at least 1, got {num_partitions}")
    return [i for i in range(num_partitions) if dataclasses.replace(plan, partition=(i, num_partitions)).has_missing]


def child_parameters(config: ExtractConfig, index: int, count: int) -> dict:
    """Parameters of one partition's run, as JSON (validated again by the child flow's signature)."""
    return {"config": dataclasses.asdict(config), "partition_index": index, "num_partitions": count}


@task(name="plan-fanout", cache_policy=NO_CACHE)
def plan_fanout(config: ExtractConfig) -> Plan:
    """Resolve the whole job and list what is done, without loading the model's weights."""
    return make_plan(config, load_model=False)


@task(name="pick-partitions", cache_policy=NO_CACHE)
def pick_partitions(plan: Plan, num_partitions: int) -> list[int]:
    """Choose the partitions to launch: only those owning missing shards."""
    chosen = partitions_with_work(plan, num_partitions)
    get_run_logger().info(
        "%d of %d shards missing; launching partitions %s of %d",
        len(plan.missing),
        len(plan.shards),
        chosen or "none",
        num_partitions,
    )
    return chosen


def _logger():
    """The run's logger (lines reach the UI), or the module's when called outside a run."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def run_name(index: int, count: int, attempt: int = 1) -> str:
    """The flow run name of one partition's attempt: ``partition-1-of-4``, then ``partition-1-of-4-attempt-2``."""
    return f"partition-{index}-of-{count}" + (f"-attempt-{attempt}" if attempt > 1 else "")


@task(name="launch-partition", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[5, 20, 60])
def launch_partition(deployment: str, config: ExtractConfig, index: int, count: int, attempt: int = 1) -> UUID:
    """Create partition ``index``'s flow run on ``deployment`` and return at once (a worker picks it up).

    The run is linked to this flow run as its subflow: cancelling the fan-out cancels it (Prefect's server does).
    Retried when the API fails (a busy server answers 503); the idempotency key keeps a retry from creating a
    second run when the first request got through.
    """
    from prefect.context import FlowRunContext
    from prefect.deployments import run_deployment

    name = run_name(index, count, attempt)
    parent = FlowRunContext.get()
    key = f"{parent.flow_run.id}-{name}" if parent and parent.flow_run else None
    run = run_deployment(
        deployment,
        parameters=child_parameters(config, index, count),
        timeout=0,
        flow_run_name=name,
        tags=["partition"],
        idempotency_key=key,
    )
    return run.id  # type: ignore[union-attr]


@dataclass(frozen=True)
class PartitionOutcome:
    """How one partition ended: its runs in launch order (relaunches after the first) and the last one's state."""

    index: int
    runs: tuple[str, ...]
    state: str
    message: str

    @property
    def completed(self) -> bool:
        return self.state == "Completed"

    def describe(self) -> str:
        relaunched = f", after {len(self.runs) - 1} relaunches" if len(self.runs) > 1 else ""
        return f"partition {self.index} ({self.runs[-1]}{relaunched}) {self.state}: {self.message}"


def finalize_task_runs(client: SyncPrefectClient, flow_run: FlowRun) -> int:
    """Mark the task runs that ``flow_run`` (final, not Completed) left unfinished as it ended; return how many.

    A run whose process or node was lost is marked Crashed from outside (deployments/automations.py), and
    nobody reports its task runs' end: they would stay Running for good. They get the run's final state type
    (Crashed, Failed or Cancelled) with a message naming it.
    """
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Cancelled, Crashed, Failed

    state = flow_run.state
    if state is None or not state.is_final():
        return 0  # still going: its task runs may yet finish
    make = {"CRASHED": Crashed, "CANCELLED": Cancelled}.get(state.type.value, Failed)
    message = f"Its flow run {flow_run.name} ended {state.name} while this task run was unfinished."
    unfinished = [
        t
        for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        if t.state is None or not t.state.is_final()
    ]
    for t in unfinished:
        client.set_task_run_state(t.id, make(message=message), force=True)
    return len(unfinished)


@task(name="finalize-lost-run", cache_policy=NO_CACHE)
def finalize_lost_run(run_id: str) -> int:
    """Finalize the task runs that the lost fan-out run ``run_id`` and its ended partitions left unfinished.

    A fan-out resumed after its node was lost calls this: the lost run's own task runs (``wait-for-partitions``)
    stopped with its process, and nobody else reports their end. Returns how many were finalized.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        lost = client.read_flow_run(UUID(run_id))
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[lost.id]))
        )
        runs = [lost, *children]
        count = sum(finalize_task_runs(client, r) for r in runs if not (r.state and r.state.is_completed()))
    if count:
        _logger().warning("finalized %d task runs left unfinished by the lost fan-out run %s", count, lost.name)
    return count


@task(name="wait-for-partitions", cache_policy=NO_CACHE)
def wait_for_partitions(
    runs: dict[int, UUID],
    relaunch: Callable[..., UUID] | None = None,
    max_relaunches: int = 0,
    timeout_s: float | None = None,
    poll_s: float = 2.0,
) -> list[PartitionOutcome]:
    """Wait until every partition's run is final and return how each ended.

    A run that ends Crashed (its process or node was lost: see actcache.orchestration.automations) is relaunched
    with ``relaunch(index=, attempt=)``, at most ``max_relaunches`` times per partition; Failed and Cancelled runs
    are not (a failure that repeats would only repeat). Queued partitions first: a relaunch is created only once
    none of the other runs is still waiting to start (Scheduled, AwaitingConcurrencySlot, Pending), so it never
    takes a freed slot ahead of them and a lost node costs its detection time plus one partition at the end.
    After ``timeout_s`` the runs still going are cancelled. When the fan-out's own run is being cancelled, it
    cancels its partitions at once (not after its own process is stopped and the server's cleanup loop notices).
    """
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run as this_run

    logger = _logger()
    names: dict[int, list[str]] = {i: [] for i in runs}  # each partition's ended runs, in launch order
    pending, ended = dict(runs), {}
    due: dict[int, FlowRun] = {}  # crashed runs to relaunch once no partition queued before them waits to start
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    parent_id, cancelled = this_run.id, False  # no id: called outside a flow run (tests, run_sequential)
    asked: set[UUID] = set()  # the partition runs set Cancelling
    with get_client(sync_client=True) as client, _cancels_partitions_on_stop(client, parent_id, pending, asked):
        while pending or due:
            if parent_id is not None and not cancelled and _being_cancelled(client, parent_id):
                cancelled = True
                ended.update(due)  # nothing is relaunched any more
                due.clear()
                _cancel_partitions(client, pending, asked)
            queued = False  # some run of this fan-out has not started yet (or its state is unknown)
            for index, run_id in list(pending.items()):
                try:
                    run = client.read_flow_run(run_id)
                except Exception as e:  # the API is busy or away: the partitions run on regardless
                    logger.warning("could not read partition %d's run (%s); still waiting", index, e)
                    queued = True
                    continue
                if run.state is None or not run.state.is_final():
                    queued |= run.state is None or run.state.is_scheduled() or run.state.is_pending()
                    continue
                del pending[index]
                names[index].append(run.name)
                attempt = len(names[index])
                if not run.state.is_completed():
                    try:
                        finalize_task_runs(client, run)
                    except Exception as e:  # records only: never what fails the job
                        logger.warning("could not finalize the task runs of %s: %s", run.name, e)
                if run.state.is_crashed() and relaunch is not None and attempt <= max_relaunches and not cancelled:
                    logger.warning(
                        "partition %d (%s) Crashed: %s Relaunching it after the partitions queued before it "
                        "(relaunch %d of at most %d).",
                        index,
                        run.name,
                        run.state.message,
                        attempt,
                        max_relaunches,
                    )
                    due[index] = run
                else:
                    ended[index] = run
            if due and not queued and relaunch is not None:  # queued partitions first: none jumps ahead of them
                for index in sorted(due):
                    pending[index] = relaunch(index=index, attempt=len(names[index]) + 1)
                due.clear()
            if (pending or due) and deadline is not None and time.monotonic() >= deadline:
                ended.update(due)  # never relaunched: the job ends with their crash
                due.clear()
                for index, run_id in pending.items():
                    client.set_flow_run_state(
                        run_id, Cancelling(message=f"The fan-out stopped waiting after timeout_s={timeout_s:g}.")
                    )
                    ended[index] = run = client.read_flow_run(run_id)
                    names[index].append(run.name)
                    logger.error(
                        "partition %d (%s) not finished after timeout_s=%g: cancelling it", index, run.name, timeout_s
                    )
                break
            if pending or due:
                time.sleep(poll_s)
    return [
        PartitionOutcome(i, tuple(names[i]), ended[i].state.name, ended[i].state.message or "")  # type: ignore[union-attr,arg-type]
        for i in sorted(ended)
    ]


def _cancel_partitions(client: SyncPrefectClient, pending: dict[int, UUID], asked: set[UUID]) -> None:
    """Set every pending partition's run ``Cancelling`` (its worker then stops it), once."""
    for index, run_id in pending.items():
        if run_id not in asked:
            client.set_flow_run_state(run_id, Cancelling(message="Its fan-out was cancelled."))
            asked.add(run_id)
            _logger().warning("the fan-out is being cancelled: cancelling partition %d", index)


@contextlib.contextmanager
def _cancels_partitions_on_stop(
    client: SyncPrefectClient, parent_id: str | None, pending: dict[int, UUID], asked: set[UUID]
):
    """Cancel the partitions still ``pending`` at once when the worker stops this process because the fan-out is
    being cancelled (its SIGTERM, which Prefect raises as TerminationSignal), whatever the wait was doing: no poll
    to wait for, and no cleanup loop on the server after this process is gone. A SIGTERM for another reason (the
    worker or node shutting down) leaves them running: a resumed fan-out finds their shards stored."""
    from prefect.exceptions import TerminationSignal

    try:
        yield
    except TerminationSignal:
        if parent_id is not None and _being_cancelled(client, parent_id):
            _cancel_partitions(client, pending, asked)
            record_cancelled(f"Cancelled; its {len(pending)} partitions still going were asked to stop.")
        raise


def _being_cancelled(client: SyncPrefectClient, run_id: str) -> bool:
    try:
        state = client.read_flow_run(UUID(str(run_id))).state
    except Exception:  # the API is busy or away: ask again at the next poll
        return False
    return state is not None and (state.is_cancelling() or state.is_cancelled())


@task(name="check-partitions", cache_policy=NO_CACHE)
def check_partitions(outcomes: list[PartitionOutcome]) -> None:
    """Fail with every partition that did not complete named (after its relaunches)."""
    failed = [o.describe() for o in outcomes if not o.completed]
    if failed:
        raise ActcacheError(
            f"{len(failed)} of {len(outcomes)} partitions did not complete: "
            + "; ".join(failed)
            + " (see their logs; rerunning computes only what is missing)"
        )


@task(name="summarize-fanout", cache_policy=NO_CACHE)
def summarize_fanout(before: Plan, after: Plan, outcomes: list[PartitionOutcome], num_partitions: int) -> dict:
    """Publish the job's summary: per set (artifact ``fanout-<set id>``), a row per partition and one for all."""
    from actcache.tasks.manifest import artifact_key, publish_table

    by_index = {o.index: o for o in outcomes}
    tables = {}
    for old, new, url in zip(before.sets, after.sets, after.urls, strict=True):
        context = new.key.tokens.context_size
        rows = []
        for i in [*range(num_partitions), None]:
            mine = [w for w in before.shards if i is None or w.index % num_partitions == i]
            todo = [w for w in mine if w not in old.done]
            o = by_index.get(i)
            rows.append(
                {
                    "partition": "all" if i is None else str(i),
                    "runs": ", ".join(o.runs) if o else "",
                    "state": o.state if o else ("" if i is None or todo else "nothing to do"),
                    "shards": len(mine),
                    "missing_before": len(todo),
                    "computed": sum(w in new.done for w in todo),
                    "missing_after": sum(w not in new.done for w in mine),
                    "tokens_computed": sum(w.n_seq for w in todo if w in new.done) * context,
                }
            )
        tables[new.set_id] = rows
        publish_table(
            artifact_key("fanout", new.set_id),
            rows,
            f"Fan-out over {num_partitions} partitions: {new.hook} of {after.config.model} -> {url}",
        )
    return tables


@task(name="verify-sets", cache_policy=NO_CACHE)
def verify_sets(plan: Plan) -> None:
    """Check every set is complete and every shard matches its checksum."""
    if plan.missing:
        raise ActcacheError(
            f"{len(plan.missing)} shards are still missing after every partition completed "
            f"(indices {[w.index for w in plan.missing][:10]}...); rerun the fan-out"
        )
    problems = [f"{ref.url}: {p}" for ref in plan.refs for p in open_set(ref).verify()]
    if problems:
        raise ActcacheError(f"{len(problems)} problems: " + "; ".join(problems[:5]))
