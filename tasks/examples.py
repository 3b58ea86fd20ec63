"""One sequence per example (--packing none): read, check, extract the selected rows, write the manifests."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache.extraction import stages
from actcache.extraction.plan import Plan


@task(name="extract-examples", cache_policy=NO_CACHE)
def extract_examples(plan: Plan) -> list[str]:
    """Extract every missing shard of the example sets (each example alone, padding masked); return the set URLs."""
    return stages.extract_examples(plan)
