"""A run stopped for a cancel records Cancelled itself, and its engine then ends in that state."""

from __future__ import annotations

import signal

import pytest


def test_a_cancelled_run_ends_in_the_state_it_recorded(prefect_console):
    """The run is Cancelling (the user's cancel) when its SIGTERM arrives: it records Cancelled, and Prefect's
    engine, which keeps its own copy of the state, logs that state as the run ends (not "Running()") and does not
    overwrite it with Crashed."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.exceptions import TerminationSignal
    from prefect.states import Cancelling

    from actcache.orchestration.cancel import record_cancelled

    ran: dict[str, object] = {}

    @flow
    def stopped() -> None:
        run_id = FlowRunContext.get().flow_run.id
        ran["id"] = run_id
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, Cancelling(), force=True)  # what `prefect flow-run cancel` does
        try:
            raise TerminationSignal(signal.SIGTERM)  # what the worker's SIGTERM raises in the flow
        except TerminationSignal:
            ran["recorded"] = record_cancelled("Cancelled: test")
            raise

    # Prefect passes the SIGTERM on to the handler it found once the flow has ended: here one that only counts it.
    signals: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: signals.append(signum))
    try:
        with pytest.raises(TerminationSignal):
            stopped()
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = prefect_console.readouterr().err
    assert ran["recorded"] is True
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(ran["id"]).state
    assert state.name == "Cancelled" and state.message == "Cancelled: test", state
    finished = [line for line in err.splitlines() if "Finished in state" in line]
    assert finished and "Finished in state Cancelled" in finished[-1] and "Running()" not in err, err[-3000:]
    assert "Crash detected" not in err, err[-3000:]


def test_a_sigterm_without_a_cancel_records_nothing(prefect_console):
    """A SIGTERM for another reason (a node shutting down: the run is not Cancelling) changes no state."""
    from prefect import flow
    from prefect.context import FlowRunContext

    from actcache.orchestration.cancel import record_cancelled

    @flow
    def running() -> str:
        assert FlowRunContext.get() is not None
        return "recorded" if record_cancelled("Cancelled: test") else "nothing"

    assert running() == "nothing"
    assert record_cancelled("outside a flow run") is False
