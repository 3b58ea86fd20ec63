"""Python entry points: ``extract`` runs the Prefect flow; ``open_set`` reads a set back."""

from __future__ import annotations

from typing import Any

from actcache import errors, tempserver
from actcache.config import ExtractConfig
from actcache.plan import make_plan


def extract(config: ExtractConfig | None = None, **options: Any) -> str | list[str]:
    """Extract activations as configured (see ``ExtractConfig``); return the set's URL.

    With several comma-separated hooks, one set per hook, and a list of their URLs.

    Everything is validated before Prefect starts, so bad input fails fast and writes nothing.
    """
    tempserver.start()  # boots while the plan loads the model
    cfg = config.replace(**options) if config else ExtractConfig(**options)
    plan = make_plan(cfg)
    from flows.extract import extract_activations

    # A user error inside the flow reaches the caller as its one-line ActcacheError; Prefect's console would
    # print its traceback first (the UI keeps it; --debug / ACTCACHE_TRACEBACK=1 keep it on the console too).
    # The flow gets the names resolved here, pinned: it computes the same sets.
    with tempserver.prefect_api(), errors.user_errors_off_console(enabled=not errors.debug_requested()):
        state = extract_activations(plan.pinned_config, return_state=True)
        urls = state.result(raise_on_failure=True)
    return urls[0] if len(urls) == 1 else urls
