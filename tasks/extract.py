"""Stage 2: one forward pass per shard, stopped right after the deepest requested hook."""

from __future__ import annotations

import math

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from actcache import crashpoints, progress
from actcache.extraction import handles
from actcache.extraction.forward import pick_device
from actcache.extraction.plan import Plan
from actcache.extraction.tokens import ShardWork
from actcache.format import shard
from actcache.format.shardfile import ShardFile
from actcache.tasks.refs import ActivationsRef


@task(name="extract", task_run_name="extract-{work.index:06d}", cache_policy=NO_CACHE)
def extract(plan: Plan, work: ShardWork) -> list[ActivationsRef]:
    """Compute shard ``work.index`` for every hook still missing it (model loaded once per process)."""
    hooks = [s.hook for s in plan.todo(work)]
    tokens = plan.token_cache().load(work.index, work.n_seq)  # checksummed; the first n_seq of a full shard
    cfg = plan.config
    step = plan.extractor(hooks)  # the pinned model and engines: nothing is resolved again here
    pinned = pick_device(cfg.device).startswith("cuda")
    files: dict[str, ShardFile] = {}

    def shard_file(hook: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Where the forward pass writes ``hook``'s activations: the stored file's own buffer."""
        want = plan.hook_set(hook).hook_shape  # the manifest's d comes from it: a disagreement is a bug, never a set
        if shape[-1] != math.prod(want):
            raise RuntimeError(f"hook {hook!r} gave width {shape[-1]}, the plan says {list(want)}")
        key = plan.hook_set(hook).key
        f = ShardFile(
            {"activations": (shard.TORCH_DTYPES[key.dtype], shape), "tokens": (tokens.dtype, tuple(tokens.shape))},
            {"set_id": key.id, "hook": key.hook, "index": str(work.index)},
            pinned=pinned,
        )
        f.tensors["tokens"].copy_(tokens)
        files[hook] = f
        return f.tensors["activations"]

    finite: dict[str, bool] = {}
    progress.shard_started(tokens.numel())  # the bar moves with each batch of this pass
    try:
        step(tokens, into=shard_file, finite=finite)
    except BaseException:
        for f in files.values():
            f.release()
        raise
    for h, f in files.items():
        f.source_finite = finite.get(h, True)
    crashpoints.point("extract.forward-done")
    return [ActivationsRef(handles.put(files[h]), h, work.index, work.n_seq) for h in hooks]
