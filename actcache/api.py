"""Python entry points: ``extract`` runs the Prefect flow where there is work; ``open_set`` reads a set back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from actcache import console
from actcache.config import ExtractConfig
from actcache.extraction.plan import make_plan
from actcache.extras import require_extract
from actcache.orchestration import flow_run, tempserver


@dataclass(frozen=True)
class SetResult:
    """One set after a request (the field names of ``actcache extract --json``)."""

    url: str
    set_id: str
    hook: str
    n_shards: int
    shards_skipped: int
    """Shards already in the store when the request started."""
    shards_computed: int
    n_tokens: int
    bytes: int
    complete: bool
    tokens_computed: int = 0
    """Tokens this request computed (0 when every shard was already stored)."""
    seconds: float = 0.0
    """How long the flow ran (0 when it did not run)."""
    run_url: str | None = None
    """The flow run in the Prefect UI, where runs are kept (PREFECT_API_URL set); else None."""
    reused: bool = False
    """The same token ids were already stored, read another way (from text, or from --token-column): ``set_id`` is
    that set, and nothing was computed."""
    requested_id: str | None = None
    """With ``reused``: the id this request's settings name (no folder of that id is written); else None."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def extract(config: ExtractConfig | None = None, *, like: str | None = None, **options: Any) -> str | list[str]:
    """Extract activations as configured (see ``ExtractConfig``); return the set's URL.

    With several comma-separated hooks, one set per hook, and a list of their URLs.

    ``like``: a set URL whose manifest gives every setting that changes the bytes, as ``actcache extract --like``
    does; ``options`` (and the fields of ``config`` that differ from the defaults) override them. Without overrides
    of settings that change the bytes, the result is checked to be that same set before anything is written.

    Everything is validated before Prefect starts, so bad input fails fast and writes nothing.
    """
    check = None
    if like is not None:
        from actcache.sets import reproduce

        cfg, check = reproduce.config_like(like, *_given(config, options))
    else:
        cfg = config.replace(**options) if config else ExtractConfig(**options)
    urls = [s.url for s in extract_sets(cfg, check=check)]
    return urls[0] if len(urls) == 1 else urls


def _given(config: ExtractConfig | None, options: dict[str, Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """Every field's value, and the names of those given (as the CLI's flags): the options, and the fields of
    ``config`` that differ from the defaults."""
    names = [f.name for f in fields(ExtractConfig)]
    unknown = set(options) - set(names)
    if unknown:
        raise TypeError(f"extract() got unexpected options {sorted(unknown)}")
    defaults = ExtractConfig()
    base = config or defaults
    values = {n: options.get(n, getattr(base, n)) for n in names}
    given = {n for n in names if getattr(base, n) != getattr(defaults, n)} | set(options)
    return values, frozenset(given)


def extract_sets(cfg: ExtractConfig, *, check: Callable[[Any], None] | None = None) -> list[SetResult]:
    """Plan ``cfg`` from the store without loading weights; run the flow only where there is work (or where a
    Prefect API is configured, so that every request shows there); describe each set afterwards.

    ``check(plan)`` may refuse the plan (``ActcacheError``) before anything is written.
    """
    require_extract("extraction")
    plan = make_plan(cfg, load_model=False)
    if check is not None:
        check(plan)
    before = plan
    consolidated = {} if plan.has_missing else _manifests(plan)
    seconds, run_url = 0.0, None
    work = plan.has_missing or len(consolidated) < len(plan.sets)
    if work and not plan.has_missing:
        plan.store.check_writable()  # only manifests to write (make_plan checked where shards are missing)
    if work or (tempserver.api_configured() and _writable(plan.store)):
        tempserver.start()  # boots while the model loads
        plan.check_memory()  # a refusal is the only line printed, before any status line
        with console.status(f"loading {cfg.model} (libraries and weights)"):
            plan.load_model()
        from actcache.extraction import stages

        # The flow gets the names resolved here, pinned: it computes the same sets, and its plan task takes this
        # plan instead of making it again (``stages.remember``).
        stages.remember(plan)
        try:
            seconds, run_url = flow_run.run_extract(plan)
            # The flow's last plan: the store after its last shard, up to where the dataset ends (known now).
            plan = stages.finished(plan) or plan.refreshed()
        finally:
            stages.forget()
        consolidated = _manifests(plan)
    out = []
    for s, old in zip(plan.sets, before.sets, strict=True):
        m = consolidated.get(s.stored_id) or {}
        new = set() if s.stored_as else {w.index for w in s.done} - {w.index for w in old.done}
        out.append(
            SetResult(
                plan.store.url_of(s.stored_id),
                s.stored_id,
                s.hook,
                m.get("n_shards", len(plan.shards)),  # the whole set's, as n_tokens (a lower --max-tokens asks less)
                # Reused: every shard asked for was stored (in the set reused), also when the flow found it only
                # after tokenizing (packed sequences), when the plan before it knew of none.
                len(s.done) if s.stored_as else len(old.done),
                len(new),
                m.get("n_tokens", 0),
                m.get("bytes", 0),
                bool(m.get("complete")),
                sum(r["n_tokens"] for r in m.get("shards", []) if r["index"] in new),
                round(seconds, 3),
                run_url,
                s.stored_as is not None,
                s.set_id if s.stored_as else None,
            )
        )
    return out


def _writable(store: Any) -> bool:
    """Whether ``store`` takes writes (a complete set in a read-only store is read, and no flow run is recorded)."""
    from actcache.errors import ActcacheError

    try:
        store.check_writable()
    except ActcacheError:
        return False
    return True


def _manifests(plan: Any) -> dict[str, dict[str, Any]]:
    """Each set's manifest where it lists every shard the plan asks for (a run killed after its last shard and
    before its manifest leaves one missing or behind: the flow then writes it)."""
    from actcache.errors import ActcacheError
    from actcache.format import manifest

    out = {}
    wanted = {w.index for w in plan.shards}
    for s in plan.sets:
        try:
            m = manifest.read(plan.store, s.stored_id)
        except ActcacheError:
            continue
        if wanted <= {r["index"] for r in m["shards"]}:
            out[s.stored_id] = m
    return out
