"""Stage 1: tokenize and pack the dataset into token shards (cached on their own key)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache.extraction.plan import Plan
from actcache.extraction.tokens import ShardWork


@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize(plan: Plan) -> list[ShardWork]:
    """Ensure token shards exist for the target; return the activation shards still to compute."""
    cfg = plan.config
    if not plan.has_missing and not cfg.verify_existing:
        return []  # nothing to compute: the token cache is not even opened

    def feeds(index: int) -> bool:  # the token shards this run feeds to the model: re-hashed first
        return index < len(plan.shards) and bool(plan.todo(plan.shards[index]))

    r = plan.resolved  # the pinned dataset and tokenizer: the dataset name is not looked up again
    shards = plan.token_cache().ensure(
        cfg.target_seqs,
        r.dataset.texts,
        r.model.tokenizer,
        r.separator_id,
        r.bos_id,
        check=None if cfg.verify_existing else feeds,
    )
    return [w for w in shards if plan.todo(w)]
