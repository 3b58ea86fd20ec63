"""The fan-out flow: one extraction split into partitions, each run by a worker on a work pool.

    prefect deployment run extract-fanout/fanout -p num_partitions=8   # see README, "Deploying"
"""

from __future__ import annotations

from prefect import flow

from actcache.config import ExtractConfig
from tasks.fanout import launch_partition, pick_partitions, plan_fanout, verify_sets, wait_for_partitions
from tasks.manifest import write_manifest
from tasks.tokenize import tokenize


@flow(name="extract-fanout")
def extract_fanout(config: ExtractConfig = ExtractConfig(), num_partitions: int = 4,
                   deployment: str = "extract-activations/partition", poll_s: float = 2.0) -> list[str]:
    """Split an extraction over ``num_partitions`` runs of ``deployment``; consolidate and verify the sets."""
    plan = plan_fanout(config)
    tokenize(plan)  # once, here: partitions then only read the token cache
    chosen = pick_partitions(plan, num_partitions)
    pinned = plan.pinned_config  # hub names pinned to the commits resolved above: a moving branch changes nothing
    runs = {i: launch_partition(deployment, pinned, i, num_partitions) for i in chosen}
    wait_for_partitions(runs, poll_s)
    final = plan_fanout(pinned)
    urls = write_manifest(final)
    verify_sets(final)
    return urls
