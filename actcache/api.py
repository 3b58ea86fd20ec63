"""Python entry points: ``extract`` runs the Prefect flow where there is work; ``open_set`` reads a set back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from actcache import errors
from actcache.config import ExtractConfig
from actcache.extraction.plan import make_plan
from actcache.orchestration import tempserver


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def extract(config: ExtractConfig | None = None, **options: Any) -> str | list[str]:
    """Extract activations as configured (see ``ExtractConfig``); return the set's URL.

    With several comma-separated hooks, one set per hook, and a list of their URLs.

    Everything is validated before Prefect starts, so bad input fails fast and writes nothing.
    """
    cfg = config.replace(**options) if config else ExtractConfig(**options)
    urls = [s.url for s in extract_sets(cfg)]
    return urls[0] if len(urls) == 1 else urls


def extract_sets(cfg: ExtractConfig, *, check: Callable[[Any], None] | None = None) -> list[SetResult]:
    """Plan ``cfg`` from the store without loading weights; run the flow only where there is work (or where a
    Prefect API is configured, so that every request shows there); describe each set afterwards.

    ``check(plan)`` may refuse the plan (``ActcacheError``) before anything is written.
    """
    plan = make_plan(cfg, load_model=False)
    if check is not None:
        check(plan)
    before = plan
    consolidated = {} if plan.has_missing else _manifests(plan)
    work = plan.has_missing or len(consolidated) < len(plan.sets)
    if work and not plan.has_missing:
        plan.store.check_writable()  # only manifests to write (make_plan checked where shards are missing)
    if work or (tempserver.api_configured() and _writable(plan.store)):
        tempserver.start()  # boots while the model loads
        plan.load_model()
        from actcache.flows.extract import extract_activations

        # A user error inside the flow reaches the caller as its one-line ActcacheError; Prefect's console would
        # print its traceback first (the UI keeps it; --debug / ACTCACHE_TRACEBACK=1 keep it on the console too).
        # The flow gets the names resolved here, pinned: it computes the same sets.
        with tempserver.prefect_api(), errors.user_errors_off_console(enabled=not errors.debug_requested()):
            state = extract_activations(plan.pinned_config, return_state=True)
            state.result(raise_on_failure=True)
        plan = plan.refreshed()  # the shards up to where the dataset ends, known now
        consolidated = _manifests(plan)
    out = []
    for s, old in zip(plan.sets, before.sets, strict=True):
        m = consolidated.get(s.set_id) or {}
        out.append(
            SetResult(
                plan.store.url_of(s.set_id),
                s.set_id,
                s.hook,
                len(plan.shards),
                len(old.done),
                len(s.done) - len(old.done),
                m.get("n_tokens", 0),
                m.get("bytes", 0),
                bool(m.get("complete")),
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
            m = manifest.read(plan.store, s.set_id)
        except ActcacheError:
            continue
        if wanted <= {r["index"] for r in m["shards"]}:
            out[s.set_id] = m
    return out
