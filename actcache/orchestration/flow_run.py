"""Running the extract flow for a plan: the library's one way into ``actcache.flows`` (a lint rule keeps it so)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from actcache import console, errors
from actcache.orchestration import logs, tempserver


def run_extract(plan: Any) -> tuple[float, str | None]:
    """Run the extract flow on ``plan.pinned_config`` (on the configured Prefect API, or a temporary server); raise
    its failure. Returns how long the flow ran and where the UI shows the run (None on a temporary server)."""
    with contextlib.ExitStack() as running:
        with console.status("starting Prefect"):
            from actcache.flows.extract import extract_activations

            if tempserver.will_start():
                console.update_status("starting the local Prefect server")
            temporary = running.enter_context(tempserver.prefect_api())
            # A user error inside the flow reaches the caller as its one-line ActcacheError; Prefect's
            # console would print its traceback first (the UI keeps it; --debug / ACTCACHE_TRACEBACK=1 keep
            # it on the console too). On the command line Prefect's run logs stay off the console
            # (--verbose: on).
            debug = errors.debug_requested()
            running.enter_context(logs.user_errors_off_console(enabled=not debug))
            running.enter_context(console.run_logs_off_console(enabled=console.quiet(), errors=debug))
            console.update_status("starting the flow run")
            started = time.perf_counter()
            state = extract_activations(plan.pinned_config, return_state=True)
        seconds = time.perf_counter() - started
        run_url = None if temporary else tempserver.run_url(state)
        state.result(raise_on_failure=True)
    return seconds, run_url
