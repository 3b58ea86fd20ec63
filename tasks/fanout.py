"""Fan one extraction out over partitions, each a flow run of a deployment on a work pool.

The parent never loads the model: it plans from listings, tokenizes once (so partitions only read the
token cache and never write the same file), launches one child run per partition that owns missing
shards, waits, then consolidates and verifies. How many children run at once is Prefect's business
(deployment concurrency limit, work pool limit, worker ``--limit``), not ours.
"""

from __future__ import annotations

import dataclasses
import time
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from actcache.config import ExtractConfig
from actcache.errors import ActcacheError
from actcache.plan import Plan, make_plan
from actcache.reader import open_set


def partitions_with_work(plan: Plan, num_partitions: int) -> list[int]:
    """The partitions that own at least one missing shard (ownership is ``Plan.owns``, nowhere else)."""
    if num_partitions < 1:
        raise ActcacheError(f"num_partitions must be at least 1, got {num_partitions}")
    return [i for i in range(num_partitions)
            if dataclasses.replace(plan, partition=(i, num_partitions)).missing]


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
    get_run_logger().info("%d of %d shards missing; launching partitions %s of %d", len(plan.missing),
                          len(plan.shards), chosen or "none", num_partitions)
    return chosen


@task(name="launch-partition", cache_policy=NO_CACHE)
def launch_partition(deployment: str, config: ExtractConfig, index: int, count: int) -> UUID:
    """Create partition ``index``'s flow run on ``deployment`` and return at once (a worker picks it up)."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=child_parameters(config, index, count), timeout=0,
                         flow_run_name=f"partition-{index}-of-{count}", tags=["partition"])
    return run.id


@task(name="wait-for-partitions", cache_policy=NO_CACHE)
def wait_for_partitions(runs: dict[int, UUID], poll_s: float = 2.0) -> None:
    """Wait until every child run is final; fail with every unsuccessful partition named."""
    from prefect.client.orchestration import get_client

    pending, failed = dict(runs), []
    count = len(runs)
    with get_client(sync_client=True) as client:
        while pending:
            for index, run_id in list(pending.items()):
                run = client.read_flow_run(run_id)
                if run.state is None or not run.state.is_final():
                    continue
                del pending[index]
                if not run.state.is_completed():
                    failed.append(f"partition {index} ({run.name}) {run.state.name}: {run.state.message or ''}")
            if pending:
                time.sleep(poll_s)
    if failed:
        raise ActcacheError(f"{len(failed)} of {count} partitions did not complete: " + "; ".join(failed)
                            + " (see their logs; rerunning computes only what is missing)")


@task(name="verify-sets", cache_policy=NO_CACHE)
def verify_sets(plan: Plan) -> None:
    """Check every set is complete and every shard matches its checksum."""
    if plan.missing:
        raise ActcacheError(f"{len(plan.missing)} shards are still missing after every partition completed "
                            f"(indices {[w.index for w in plan.missing][:10]}...); rerun the fan-out")
    problems = [f"{ref.url}: {p}" for ref in plan.refs for p in open_set(ref).verify()]
    if problems:
        raise ActcacheError(f"{len(problems)} problems: " + "; ".join(problems[:5]))
