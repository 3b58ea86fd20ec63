"""The stages of one extraction as plain functions: plan, tokenize, extract, compress, upload, write the manifest.

Each takes the plan and small references and returns small references (``extraction.refs``); tensors stay in
the process-local hand-off (``extraction.handles``). The Prefect tasks in ``actcache.tasks`` wrap one call each,
and ``run_sequential`` calls them in the flow's order without Prefect, for debugging and tests.

A plan is made once per request: ``remember`` keeps the one ``api.extract_sets`` made, and ``plan`` hands it to
the flow it starts in this process when asked for the same pinned config (a deployment's run, in another
process, plans from its config).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from actcache import crashpoints, progress
from actcache.config import ExtractConfig
from actcache.errors import Failure
from actcache.extraction import environment, handles, memory
from actcache.extraction.plan import HookSet, Plan, make_plan
from actcache.extraction.refs import ActivationsRef, PackedRef
from actcache.extraction.tokens import ShardWork, TokenCache
from actcache.format import content, layout, manifest, moments, records, shard, shardfile
from actcache.format.commit import Points, Shard, commit, rebuilding
from actcache.format.key import SetKey
from actcache.inputs.model import hook_layer
from actcache.read.exclude import special_ids
from actcache.storage import leases

ROUNDS = 3
"""Passes over the shards: the first, then redoing what a concurrent run with another --max-tokens replaced."""

UPLOAD_POINTS = Points(shard_written="upload.shard-written", record_written="upload.record-written")
MANIFEST_POINTS = Points(before_manifest="manifest.before-write", manifest_written="manifest.written")


# -- plan ------------------------------------------------------------------------------------------------
class _Slot:
    """One plan handed between a request and the flow it runs in this process, keyed by its pinned config and
    partition, taken once (a plan of another request, or one nobody took, is replaced by the next)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: tuple[str, Plan] | None = None

    @staticmethod
    def key(config: ExtractConfig, partition: tuple[int, int]) -> str:
        return json.dumps([dataclasses.asdict(config), list(partition)], sort_keys=True, default=str)

    def put(self, plan: Plan | None) -> None:
        with self._lock:
            self._held = None if plan is None else (self.key(plan.pinned_config, plan.partition), plan)

    def take(self, config: ExtractConfig, partition: tuple[int, int]) -> Plan | None:
        with self._lock:
            held, self._held = self._held, None
        return held[1] if held is not None and held[0] == self.key(config, partition) else None


_made, _finished = _Slot(), _Slot()


def remember(plan: Plan) -> None:
    """Keep ``plan`` (made with its weights loaded) for the next ``plan`` call of its pinned config here."""
    _made.put(plan)
    _finished.put(None)


def forget() -> None:
    """Drop the plans a request and its flow handed each other and did not take."""
    _made.put(None)
    _finished.put(None)


def plan(config: ExtractConfig, partition_index: int = 0, num_partitions: int = 1) -> Plan:
    """Resolve model, dataset and keys and list each set's completed shards once (``make_plan``), or take the plan
    this process made for the same pinned config a moment ago (``remember``)."""
    made = _made.take(config, (partition_index, num_partitions))
    if made is not None:
        return dataclasses.replace(made, config=config)  # as a plan made from the pinned config holds it
    return make_plan(config, partition_index=partition_index, num_partitions=num_partitions)


def finished(plan: Plan) -> Plan | None:
    """The plan the flow ended with (``write_manifest``'s, as the store was after its last shard) when it ran in
    this process for ``plan``'s pinned config since ``remember``; else None."""
    return _finished.take(plan.pinned_config, plan.partition)


@dataclass(frozen=True)
class Stored:
    """What the store already holds when a run starts, in a line per set."""

    cached: bool
    """Some shards were already stored (the flow shows its task as Cached)."""
    message: str
    done: dict[str, list[int]]
    """Each set's id: the indices of its shards already stored."""


def already_stored(plan: Plan) -> Stored:
    """What the store already holds, for the run's log."""
    n = len(plan.shards)
    lines = [
        f"{s.hook}: {len(s.done)} of {n} shards already stored"
        if plan.shards.known
        else f"{s.hook}: {len(s.done)} shards already stored, of up to {n} (where the dataset ends is not known yet)"
        for s in plan.sets
    ]
    return Stored(bool(plan.n_done), "; ".join(lines), {s.set_id: sorted(w.index for w in s.done) for s in plan.sets})


def recheck(plan: Plan, last: bool) -> tuple[Plan, list[ShardWork]]:
    """The plan as the store is now, and this run's shards that are no longer done.

    Runs of one set with different --max-tokens may run at once: the lower one's partial last shard can land
    over the higher one's full shard (or its record over the other's bytes) in a race. Each run then computes
    what it misses again: a partial shard never replaces a larger one that is in place (``upload``), so this
    converges to the largest; ``last`` fails the run instead (a rerun resumes).
    """
    fresh = plan.refreshed()  # where the data ends is known by now
    again = fresh.missing
    if again and last:
        raise Failure(
            f"shards {[w.index for w in again][:10]} of {', '.join(plan.urls)} kept being replaced by "
            "concurrent runs; rerun the same command"
        )
    return fresh, again


# -- 1. tokenize -----------------------------------------------------------------------------------------
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
        *plan.documents(),
        r.separator_id,
        r.bos_id,
        check=None if cfg.verify_existing else feeds,
    )
    return [w for w in shards if plan.todo(w)]


def reuse_stored(plan: Plan, work: list[ShardWork]) -> tuple[Plan, list[ShardWork]]:
    """After ``tokenize``: the plan with each set whose token ids another complete set of the store holds (read
    from text or ``--token-column``: ``extraction.reuse``) reused, and the work left."""
    if not work:
        return plan, work
    from actcache.extraction import reuse

    found = reuse.packed(plan)
    return (plan, work) if found is plan else (found, [w for w in work if found.todo(w)])


# -- 2. extract ------------------------------------------------------------------------------------------
def extract(plan: Plan, work: ShardWork) -> list[ActivationsRef]:
    """Compute shard ``work.index`` for every hook still missing it (model loaded once per process)."""
    from actcache.extraction.forward import pick_device

    hooks = [s.hook for s in plan.todo(work)]
    tokens = plan.token_cache().load(work.index, work.n_seq)  # checksummed; the first n_seq of a full shard
    cfg = plan.config
    step = plan.extractor(hooks)  # the pinned model and engines: nothing is resolved again here
    pinned = pick_device(cfg.device).startswith("cuda")
    files: dict[str, shardfile.ShardFile] = {}

    def shard_file(hook: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Where the forward pass writes ``hook``'s activations: the stored file's own buffer."""
        want = plan.kept_shape(hook)  # the manifest's d comes from it: a disagreement is a bug, never a set
        if shape[-1] != math.prod(want):
            raise RuntimeError(f"hook {hook!r} gave width {shape[-1]}, the plan says {list(want)}")
        key = plan.hook_set(hook).key
        f = shardfile.ShardFile(
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
        select = {h: s for h in hooks if not (s := plan.selection(h)).whole}  # --heads, --dims: on the device
        step(tokens, into=shard_file, finite=finite, **({"select": select} if select else {}))
    except BaseException:
        for f in files.values():
            f.release()
        raise
    for h, f in files.items():
        f.source_finite = finite.get(h, True)
    crashpoints.point("extract.forward-done")
    return [ActivationsRef(handles.put(files[h]), h, work.index, work.n_seq) for h in hooks]


# -- 3. compress -----------------------------------------------------------------------------------------
def compress(plan: Plan, ref: ActivationsRef) -> PackedRef:
    """Encode one shard with the set's codec; keep its stats, moments and provenance for its record."""
    hook_set = plan.hook_set(ref.hook)
    key = hook_set.key
    f: shardfile.ShardFile = handles.get(ref.handle)
    acts = f.tensors["activations"]  # [n_seq, context, d] in the storage dtype
    # Everything computed from the activations goes here, before the codec (which may release them).
    stats = shard.stats(acts)
    extra: dict[str, Any] = {
        "set_id": key.id,
        "stats": stats,
        moments.RECORD_FIELD: moments.of(acts).to_json(),
        moments.BY_TOKEN_FIELD: by_token(plan, acts, f.tensors["tokens"]).to_json(),
        "hook_shape": list(plan.kept_shape(ref.hook) if hook_set.hook_shape else [acts.shape[-1]]),
        "env": environment.current(plan.config.device, key.forward),  # who computed it (a mixed fleet shows)
    }
    del acts
    if stats["nan"] or stats["inf"]:
        where = f"shard {ref.index} of {key.hook}"
        extra["source_finite"] = shard.warn_non_finite(stats, f.source_finite, key.dtype, key.id, where)
    payload = shardfile.encode(f, codec=key.codec, level=key.codec_level)
    handles.drop(ref.handle)
    crashpoints.point("compress.encoded")
    n_tokens = ref.n_seq * key.tokens.context_size
    nbytes = len(payload.data)
    extra |= {
        "raw_bytes": payload.raw_bytes,
        "codec_ratio": round(payload.raw_bytes / nbytes, 4),
        "bytes_per_token": round(nbytes / n_tokens, 2),
    }
    return PackedRef(handles.put(payload), ref.hook, ref.index, ref.n_seq, payload.sha256, nbytes, extra)


def by_token(plan: Plan, acts: torch.Tensor, tokens: torch.Tensor) -> moments.ByToken:
    """The shard's moments by group (first position or not, special token or not): what lets a reader that
    excludes special tokens or BOS positions normalise with the exact statistics of the rows it yields."""
    first = torch.zeros(tokens.shape, dtype=torch.bool)
    first[:, 0] = True  # tokens: [n_seq, context]
    return moments.by_token(acts, tokens, first, special_ids(plan.provenance["tokenization"]))


# -- 4. upload -------------------------------------------------------------------------------------------
def upload(plan: Plan, ref: PackedRef) -> records.Record:
    """Store shard ``ref.index`` all-or-nothing and mark it done (``commit``: bytes first, record last)."""
    key = plan.hook_set(ref.hook).key
    rel = layout.shard_file(ref.index, key.codec)
    store = plan.store
    if ref.n_seq < key.tokens.seqs_per_shard:
        # A partial last shard never replaces a larger one that a run with a higher --max-tokens stored meanwhile
        # (a race that slips past this check is caught by ``recheck``).
        scan = records.scan_set(store, key)
        if scan.is_done(ref.index, ref.n_seq + 1):
            handles.get(ref.handle).release()  # its buffer goes back (a pinned one to the pool) unwritten
            handles.drop(ref.handle)
            return scan.records[ref.index]
    payload = handles.get(ref.handle)
    record = records.Record(
        ref.index, rel, ref.n_seq, ref.n_seq * key.tokens.context_size, ref.sha256, ref.bytes, ref.extra
    )
    # From the buffer the payload lies in (a retry writes it again).
    commit(store, key.id, [Shard(record, payload.data)], points=UPLOAD_POINTS)
    handles.drop(ref.handle)
    payload.release()  # as soon as the record is in: the next shard may reuse a pinned buffer
    memory.release()
    return record


# -- 5. write the manifest -------------------------------------------------------------------------------
def build_manifest(plan: Plan, s: Any, scan: records.Scan) -> dict[str, Any]:
    """Set ``s``'s manifest (a ``HookSet`` of ``plan``) from its completion records as ``scan`` found them."""
    recs = [r for r in scan.sorted_records() if scan.is_done(r.index, r.n_seq)]
    provenance = {
        **plan.provenance,
        "hook": s.hook,
        "layer": hook_layer(s.hook),
        "hook_shape": list(plan.kept_shape(s.hook)) if s.hook_shape else None,
    }
    sel = plan.selection(s.hook) if s.hook_shape else None
    if sel is not None and not sel.whole:  # (a whole hook's manifest stays as it was)
        provenance["selection"] = {"full_hook_shape": list(sel.shape), "heads": sel.heads, "dims": sel.dims}
    m = manifest.build(
        s.key,
        provenance,
        [moments.without(r) for r in recs],
        target_seqs=plan.shards.total_seqs,
        previous=scan.consolidated,
    )
    m |= moments.merged(
        recs,
        m["d"],
        full=lambda r, k=s.key: r.n_seq == k.tokens.seqs_per_shard,  # type: ignore[misc]
        previous=scan.consolidated,
        moments_of=moments.from_records(scan.store, s.set_id, m["d"]),
        by_token_of=moments.from_records(scan.store, s.set_id, m["d"], moments.BY_TOKEN_FIELD),
    )
    return m


def write_manifest(plan: Plan) -> list[str]:
    """Write each set's manifest from its completion records (one listing each); return the set URLs.

    A manifest that would say the same as the one stored (a run that computed nothing) is not rewritten."""
    if plan.config.packing == "none":  # one sequence per example: its manifests say so (a fan-out's parent)
        from actcache.extraction import examples

        urls = examples.write_manifests(plan)
        _finished.put(plan)
        return urls
    store = plan.store
    tokens = plan.token_cache()

    def publish(s: HookSet) -> None:
        scan = records.scan_set(store, s.key)
        m = build_manifest(plan, s, scan)
        cid = _content_id(tokens, s.key, m, scan.consolidated or {})
        if cid:
            m[content.MANIFEST_FIELD] = cid
            first = tokens.first_digest()
            fid = content.family_id(s.key, first) if first else content.stored_family(scan.consolidated)
            if fid:
                m[content.FAMILY_FIELD] = fid
        content.publish(store, s.set_id, m, cid, scan.consolidated, MANIFEST_POINTS)

    for s in plan.computed:  # (a set reused from another holds its own manifest)
        store.sweep_temp(s.set_id)  # what killed writers left behind
        rebuilding(functools.partial(publish, s))
    _finished.put(plan)  # the request that started this flow here answers from it (``finished``)
    return plan.urls


def _content_id(tokens: TokenCache, key: SetKey, m: dict[str, Any], previous: dict[str, Any]) -> str | None:
    """A complete packed set's content id (``format.content``): its key with the token ids of the shards it holds
    (all of them, whatever this run's target) in place of where they came from."""
    if not m["complete"]:
        return None
    digest = tokens.digest(ShardWork(r["index"], r["n_seq"]) for r in m["shards"])
    if digest is None:  # the token cache is gone (a copied set): the previous id, for the same shards
        same = previous.get("shards") == m["shards"]
        return previous.get(content.MANIFEST_FIELD) if same else None
    return content.content_id(key, digest)


# -- one sequence per example (--packing none) -------------------------------------------------------------
def extract_examples(plan: Plan) -> list[str]:
    """Extract every missing shard of the example sets (each example alone, padding masked), then write their
    manifests (``extraction.examples``); return the set URLs. It replaces stages 1-5 for ``--packing none``."""
    from actcache.extraction import examples

    urls = examples.extract(plan)
    _finished.put(plan)
    return urls


# -- all of them, without Prefect ------------------------------------------------------------------------
@leases.releasing
def run_sequential(target: Plan | ExtractConfig) -> list[str]:
    """Run every stage in the flow's order in this thread, without Prefect (for debugging and tests): the same
    shards and manifests as the flow writes. ``target`` is a plan, or a config to plan (weights loaded)."""
    p = target if isinstance(target, Plan) else plan(target)
    leases.acquire(p.store, [s.key.id for s in p.sets])  # `rm` refuses these sets while this run writes them
    if p.config.packing == "none":
        return extract_examples(p)
    p, work = reuse_stored(p, tokenize(p))
    for round_ in range(1, ROUNDS + 1):
        for w in work:
            for acts in extract(p, w):
                upload(p, compress(p, acts))
        if not work and p.shards.known:  # else the data's end was found: the manifest needs it
            break
        p, work = recheck(p, last=round_ == ROUNDS)
    return write_manifest(p)
