"""The extraction flow: tokenize -> extract -> compress -> upload, skipping every shard already stored.

prefect deploy --prefect-file deployments/prefect.yaml   # or: actcache extract ...
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.states import Completed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from actcache import console
from actcache.config import ExtractConfig
from actcache.extraction import stages
from actcache.extraction.sizing import IN_FLIGHT  # shards compressed/uploaded while the next one is extracted
from actcache.orchestration.cancel import record_cancelled
from actcache.progress import Progress, Window
from actcache.storage import leases
from actcache.tasks.compress import compress
from actcache.tasks.examples import extract_examples
from actcache.tasks.extract import extract
from actcache.tasks.manifest import progress_key, sets_message, summarize, write_manifest
from actcache.tasks.plan import plan_extraction, recheck, reuse_stored, skip_cached
from actcache.tasks.tokenize import tokenize
from actcache.tasks.upload import upload

ROUNDS = stages.ROUNDS  # passes over the shards: the first, then redoing what concurrent runs replaced


@flow(name="extract-activations", task_runner=ThreadPoolTaskRunner(max_workers=4))  # type: ignore[arg-type]
@leases.releasing
def extract_activations(
    config: ExtractConfig = ExtractConfig(), partition_index: int = 0, num_partitions: int = 1
) -> State:
    """Extract hook activations over a dataset into content-addressed sets (one per hook); return their URLs."""
    plan = plan_extraction(config, partition_index, num_partitions)
    leases.acquire(plan.store, [s.key.id for s in plan.sets])  # `rm` refuses these sets while this run writes them
    if config.packing == "none":  # one sequence per example: its own stage (actcache.extraction.examples)
        urls = extract_examples(quote(plan))
        return Completed(message=sets_message(urls), data=urls)
    skipped = {s.set_id: len(s.done) for s in plan.sets}  # before this run: what the artifact calls skipped
    skip_cached(plan)
    console.update_status("tokenizing the dataset")  # the command line's status line, where there is one
    work = tokenize(plan)
    plan, work = reuse_stored(quote(plan), work)  # the same token ids, from text or a token column, stored already
    # quote: Prefect would otherwise walk the whole plan (every shard of every set) for each task's inputs,
    # a cost per task that grows with the set; the plan is passed as is.
    q = quote(plan)
    steps = sum(len(plan.todo(w)) for w in work)  # one per hook and shard
    tokens = sum(w.n_seq for w in work) * plan.config.context_size  # what the forward passes go through
    with Progress(steps, key=progress_key(plan), log=get_run_logger().info, tokens=tokens) as progress:
        window = Window(
            IN_FLIGHT,
            on_result=lambda r: progress.advance(
                tokens=r.n_tokens, item=f"set {r.extra['set_id']} shard {r.index:06d} stored"
            ),
        )
        try:
            for round_ in range(1, ROUNDS + 1):
                for shard in work:
                    for acts in extract(q, shard):
                        window.add(upload.submit(q, compress.submit(q, acts)))
                stored = window.drain()
                if not work and plan.shards.known:  # else the data's end was found: the manifest needs it
                    break
                plan, work = recheck(q, last=round_ == ROUNDS)
                q = quote(plan)
        except TerminationSignal:  # the worker stops this run (a cancel): the forward pass stops where it is (nothing
            window.settle()  # of it is stored), the shards being compressed and stored are finished whole first
            record_cancelled("Cancelled: the shards it stored stay; the same extraction again computes the rest.")
            raise
    urls = write_manifest(plan)
    summarize(plan, stored, progress.seconds, skipped)
    return Completed(message=sets_message(urls), data=urls)  # the message shows the URLs in the UI and API
