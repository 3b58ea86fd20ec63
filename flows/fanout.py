"""The fan-out flow: one extraction split into partitions, each run by a worker on a work pool.

prefect deployment run extract-fanout/fanout -p num_partitions=8   # see README, "Deploying"
"""

from __future__ import annotations

from functools import partial

from prefect import flow
from prefect.states import Completed, Failed, State
from prefect.utilities.annotations import quote

from actcache.config import ExtractConfig
from actcache.storage import leases
from actcache.tasks.fanout import (
    check_partitions,
    finalize_lost_run,
    launch_partition,
    pick_partitions,
    plan_fanout,
    summarize_fanout,
    verify_sets,
    wait_for_partitions,
)
from actcache.tasks.manifest import sets_message, write_manifest
from actcache.tasks.plan import recheck, reuse_stored
from actcache.tasks.tokenize import tokenize


@flow(name="extract-fanout")
@leases.releasing
def extract_fanout(
    config: ExtractConfig = ExtractConfig(),
    num_partitions: int = 4,
    deployment: str = "extract-activations/partition",
    poll_s: float = 2.0,
    max_relaunches: int = 2,
    timeout_s: float = 24 * 3600.0,
    resumes: int = 0,
    lost_run_id: str | None = None,
) -> State:
    """Split an extraction over ``num_partitions`` runs of ``deployment``; consolidate and verify the sets.

    A partition whose run crashes (its node was lost) is relaunched up to ``max_relaunches`` times; partitions
    still running after ``timeout_s`` seconds are cancelled and the job fails. Returns the set URLs.
    ``resumes`` counts the runs of this fan-out lost before this one (the deployment's trigger sets it when it
    resumes a crashed fan-out); past ``max_relaunches`` the job fails instead of starting again. ``lost_run_id``
    (set by the same trigger) names the lost run: the task runs it and its partitions left Running are finalized.
    """
    if lost_run_id is not None:
        finalize_lost_run(lost_run_id)
    if resumes > max_relaunches:
        return Failed(message=f"fan-out lost {resumes} times (max_relaunches={max_relaunches}): not resumed again")
    plan = plan_fanout(config)
    leases.acquire(plan.store, [s.key.id for s in plan.sets])  # `rm` refuses these sets until the fan-out ends
    tokenize(plan)  # once, here: partitions then only read the token cache
    plan, _ = recheck(plan, last=False)  # the shards up to where the dataset ends, known now
    # The same token ids stored already (read from text or a token column): no partition is launched for that set.
    plan, _ = reuse_stored(quote(plan), plan.missing)
    chosen = pick_partitions(plan, num_partitions)
    pinned = plan.pinned_config  # hub names pinned to the commits resolved above: a moving branch changes nothing
    runs = {i: launch_partition(deployment, pinned, i, num_partitions) for i in chosen}
    relaunch = partial(launch_partition, deployment, pinned, count=num_partitions)
    outcomes = wait_for_partitions(runs, relaunch, max_relaunches, timeout_s, poll_s)
    if lost_run_id is not None:  # the lost run's partitions have ended by now (ours were queued behind them)
        finalize_lost_run(lost_run_id)
    final = plan_fanout(pinned)
    summarize_fanout(plan, final, outcomes, num_partitions)
    check_partitions(outcomes)
    urls = write_manifest(final)
    verify_sets(final)
    return Completed(message=sets_message(urls), data=urls)
