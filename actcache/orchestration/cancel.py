"""A flow run stopped for a cancel records its end itself, as soon as its work has stopped.

A cancel (`prefect flow-run cancel`, the UI) sets the run ``Cancelling``; its worker then sends the run's process
SIGTERM, which Prefect raises in the flow as ``TerminationSignal``. Prefect 3.9's process worker records
``Cancelled`` only after it has run the flow's ``on_cancellation`` hooks in a fresh process that imports the flow
again (with torch: 20-25 s on a busy machine, measured in tests/deployments/test_lost_worker.py), and the
partition's concurrency slot stays taken meanwhile. The worker then finds the run ``Cancelled`` already.
"""

from __future__ import annotations


def record_cancelled(message: str) -> bool:
    """Mark this flow run ``Cancelled`` if it is ``Cancelling``; say whether it did.

    Call it as the run stops on its SIGTERM, once nothing of its work is still going. A SIGTERM for another reason
    (a worker or node shutting down: the run is not ``Cancelling``) changes nothing, nor does an API away.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import State
    from prefect.context import FlowRunContext
    from prefect.states import Cancelled

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return False
    run_id = context.flow_run.id
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
            if state is None or not state.is_cancelling():
                return False
            recorded: State | None = client.set_flow_run_state(run_id, Cancelled(message=message)).state
    except Exception:  # the API is busy or away: the worker records the end, later
        return False
    if recorded is not None:
        # The engine keeps its own copy of the run's state: left at Running, it would log "Finished in state
        # Running()" as the run ends, and a SIGTERM it was not told of would be taken for a crash.
        flow_run = context.flow_run
        flow_run.state, flow_run.state_name, flow_run.state_type = recorded, recorded.name, recorded.type
    return True
