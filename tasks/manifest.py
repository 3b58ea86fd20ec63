"""Consolidate completion records into manifest.json, and publish the run's summary."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache.extraction import stages
from actcache.extraction.plan import Plan
from actcache.format import manifest, records


@task(name="write-manifest", cache_policy=NO_CACHE)
def write_manifest(plan: Plan) -> list[str]:
    """Write each set's manifest from its completion records (one listing each); return the set URLs."""
    return stages.write_manifest(plan)


def sets_message(urls: list[str]) -> str:
    """The final state's message: where the sets are (the UI and `prefect flow-run inspect` show it)."""
    return f"{len(urls)} set{'s' if len(urls) != 1 else ''}: {', '.join(urls)}"


def artifact_key(kind: str, set_id: str) -> str:
    """One artifact key per set and kind (``extraction-<set id>``): Prefect keys are lowercase, digits and dashes."""
    return f"{kind}-{set_id}"


def progress_key(plan: Plan) -> str:
    """The progress artifact's key: the (first) set's, and the partition's when the job is split."""
    index, count = plan.partition
    return artifact_key("progress", plan.sets[0].set_id) + (f"-part-{index}-of-{count}" if count > 1 else "")


def publish_table(key: str, rows: list[dict], description: str) -> None:
    """A keyed table artifact on the current run; a failure to publish is logged, never fatal."""
    from prefect import get_run_logger
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return  # only inside a Prefect run
    try:
        create_table_artifact(key=key, table=rows, description=description)
    except Exception as e:
        get_run_logger().warning("could not publish artifact %s: %s", key, e)


@task(name="summarize", cache_policy=NO_CACHE)
def summarize(plan: Plan, stored: list[records.Record], seconds: float) -> list[dict]:
    """Publish one table artifact per set (``extraction-<set id>``): shards, tokens, bytes, ratio, tokens/s."""
    rows = []
    index, count = plan.partition
    for s, url in zip(plan.sets, plan.urls, strict=True):
        mine = [r for r in stored if r.extra.get("set_id") == s.set_id]
        tokens = sum(r.n_tokens for r in mine)
        raw = sum(r.extra.get("raw_bytes", r.bytes) for r in mine)
        nbytes = sum(r.bytes for r in mine)
        row = {
            "set": s.set_id,
            "hook": s.hook,
            "partition": f"{index} of {count}",
            "shards_total": len(plan.shards),
            "shards_computed": len(mine),
            "shards_skipped": len(s.done),
            "tokens_computed": tokens,
            "bytes_written": nbytes,
            "compression_ratio": round(raw / nbytes, 3) if nbytes else None,
            "tokens_per_s": round(tokens / seconds, 1) if mine and seconds > 0 else None,
            **{k: v for k, v in manifest.non_finite([r.to_dict() for r in mine]).items() if k != "shards"},
        }
        rows.append(row)
        publish_table(artifact_key("extraction", s.set_id), [row], f"{plan.config.model} -> {url}")
    return rows
