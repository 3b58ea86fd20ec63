"""The fan-out's pieces: which partitions get launched, what they are passed, waiting, verifying."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from actcache.errors import ActcacheError
from actcache.extraction.plan import make_plan
from actcache.tasks.fanout import (
    check_partitions,
    child_parameters,
    partitions_with_work,
    run_name,
    verify_sets,
    wait_for_partitions,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_parent_plans_without_loading_the_model_and_launches_only_owners_of_missing_shards(base_config, monkeypatch):
    import actcache.extraction.forward
    import actcache.inputs.model
    from actcache.flows.extract import extract_activations

    def no_weights(*a, **k):
        raise AssertionError("the fan-out parent loaded the model")

    monkeypatch.setattr(actcache.inputs.model, "load_bridge", no_weights)
    monkeypatch.setattr(actcache.extraction.forward, "load_hf_stack", no_weights)
    plan = make_plan(base_config, load_model=False)
    assert [w.index for w in plan.missing] == [0, 1, 2, 3] and plan.sets[0].hook_shape == (32,)
    assert partitions_with_work(plan, 3) == [0, 1, 2]  # shards 0 and 3 belong to partition 0
    assert partitions_with_work(plan, 8) == [0, 1, 2, 3]  # more partitions than shards: no idle runs
    with pytest.raises(ActcacheError, match="num_partitions"):
        partitions_with_work(plan, 0)
    monkeypatch.undo()

    extract_activations(base_config, partition_index=1, num_partitions=3)
    after = make_plan(base_config, load_model=False)
    assert [w.index for w in after.missing] == [0, 2, 3]
    assert partitions_with_work(after, 3) == [0, 2]
    assert partitions_with_work(after, 1) == [0]


def test_child_parameters_are_json_and_pass_the_flow_signature(base_config):
    from actcache.flows.extract import extract_activations

    params = json.loads(json.dumps(child_parameters(base_config, 2, 4)))
    validated = extract_activations.validate_parameters(params)
    assert validated == {"config": base_config, "partition_index": 2, "num_partitions": 4}
    params["config"]["dtype"] = "float8"
    with pytest.raises(Exception, match="config.dtype"):
        extract_activations.validate_parameters(params)


def _flow_run(client, state, name: str | None = None):
    from prefect import flow

    @flow(name="fake-partition")
    def partition() -> None:
        pass

    return client.create_flow_run(partition, state=state, name=name).id


def test_wait_for_partitions_waits_then_names_every_unsuccessful_partition(monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Crashed, Failed, Running

    import actcache.tasks.fanout

    with get_client(sync_client=True) as client:
        ok, late = _flow_run(client, Completed()), _flow_run(client, Running())
        failed, crashed = _flow_run(client, Failed(message="CUDA out of memory")), _flow_run(client, Crashed())
        waits = []

        def poll_wait(seconds):  # the first wait between polls is when the late partition finishes
            waits.append(seconds)
            if len(waits) == 1:
                client.set_flow_run_state(late, Completed(), force=True)

        # Its own clock, not Prefect's: the wait is counted, not timed.
        monkeypatch.setattr(actcache.tasks.fanout, "time", SimpleNamespace(sleep=poll_wait, monotonic=time.monotonic))
        outcomes = wait_for_partitions.fn({0: ok, 1: late}, poll_s=0.1)
        assert waits == [0.1]  # it saw the running partition, waited once, then saw it completed
        assert [(o.index, o.state) for o in outcomes] == [(0, "Completed"), (1, "Completed")]
        check_partitions.fn(outcomes)

        # No relaunch function: a crashed partition is reported like a failed one.
        outcomes = wait_for_partitions.fn({0: ok, 1: failed, 2: crashed}, poll_s=0.1)
    with pytest.raises(ActcacheError) as e:
        check_partitions.fn(outcomes)
    msg = str(e.value)
    assert "2 of 3 partitions" in msg and "partition 1" in msg and "CUDA out of memory" in msg
    assert "partition 2" in msg and "partition 0" not in msg and "\n" not in msg


def test_crashed_partitions_are_relaunched_a_bounded_number_of_times():
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Crashed, Failed

    lost = "No heartbeat for 90 s: the run's worker or node was lost."
    with get_client(sync_client=True) as client:
        launched = []

        def relaunch(index: int, attempt: int):
            launched.append((index, attempt))
            # Partition 0 is lost once, then completes; partition 1 is lost every time.
            state = Completed() if index == 0 else Crashed(message=lost)
            return _flow_run(client, state, name=run_name(index, 3, attempt))

        first = {
            0: _flow_run(client, Crashed(message=lost), name=run_name(0, 3)),
            1: _flow_run(client, Crashed(message=lost), name=run_name(1, 3)),
            2: _flow_run(client, Failed(message="bad hook"), name=run_name(2, 3)),
        }
        outcomes = wait_for_partitions.fn(first, relaunch, max_relaunches=2, poll_s=0.05)

    assert sorted(launched) == [(0, 2), (1, 2), (1, 3)]  # a failure (partition 2) is not relaunched
    assert [o.runs for o in outcomes] == [
        ("partition-0-of-3", "partition-0-of-3-attempt-2"),
        ("partition-1-of-3", "partition-1-of-3-attempt-2", "partition-1-of-3-attempt-3"),
        ("partition-2-of-3",),
    ]
    assert [o.state for o in outcomes] == ["Completed", "Crashed", "Failed"]
    with pytest.raises(ActcacheError) as e:
        check_partitions.fn(outcomes)
    msg = str(e.value)
    assert "2 of 3 partitions did not complete" in msg
    assert "partition 1 (partition-1-of-3-attempt-3, after 2 relaunches) Crashed: No heartbeat" in msg
    assert "partition 2 (partition-2-of-3) Failed: bad hook" in msg and "partition 0" not in msg


def test_a_relaunch_waits_for_the_partitions_queued_before_it():
    """Issue 22: a relaunched partition never takes a freed slot ahead of partitions that waited before it."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import AwaitingConcurrencySlot, Completed, Crashed, Running

    with get_client(sync_client=True) as client:
        lost = _flow_run(client, Crashed(message="No heartbeat for 90 s"), name=run_name(0, 2))
        queued = _flow_run(client, AwaitingConcurrencySlot(), name=run_name(1, 2))
        seen = []

        def relaunch(index: int, attempt: int):
            seen.append((index, attempt, client.read_flow_run(queued).state.type))  # the queued one's state then
            return _flow_run(client, Completed(), name=run_name(index, 2, attempt))

        result = []
        waiter = threading.Thread(
            target=lambda: result.append(wait_for_partitions.fn({0: lost, 1: queued}, relaunch, 2, poll_s=0.05))
        )
        waiter.start()
        time.sleep(1.0)  # some 20 polls with partition 1 still queued: no relaunch may happen meanwhile
        assert seen == []
        client.set_flow_run_state(queued, Running(), force=True)  # a slot freed: partition 1 started first
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        client.set_flow_run_state(queued, Completed(), force=True)
        waiter.join(timeout=30)

    assert seen == [(0, 2, StateType.RUNNING)]
    [outcomes] = result
    assert [(o.runs, o.state) for o in outcomes] == [
        (("partition-0-of-2", "partition-0-of-2-attempt-2"), "Completed"),
        (("partition-1-of-2",), "Completed"),
    ]


def test_a_fanout_being_cancelled_cancels_its_partitions_at_once(monkeypatch):
    """Issue 22: the parent cancels its partitions itself at its next poll, not after its own process is stopped
    and the server's cleanup loop notices; a crashed partition is then not relaunched."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling, Crashed, Running

    with get_client(sync_client=True) as client:
        parent = _flow_run(client, Running(), name="fanout")
        running = _flow_run(client, Running(), name=run_name(0, 2))
        lost = _flow_run(client, Crashed(message="No heartbeat for 90 s"), name=run_name(1, 2))
        monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(parent))  # what prefect.runtime reads outside a context
        relaunched = []
        result = []
        waiter = threading.Thread(
            target=lambda: result.append(
                wait_for_partitions.fn({0: running}, lambda **kw: relaunched.append(kw), 2, poll_s=0.05)
            )
        )
        waiter.start()
        client.set_flow_run_state(parent, Cancelling(), force=True)  # the user's cancel
        deadline = time.monotonic() + 30
        while not client.read_flow_run(running).state.is_cancelling() and time.monotonic() < deadline:
            time.sleep(0.05)
        state = client.read_flow_run(running).state
        assert state.is_cancelling() and state.message == "Its fan-out was cancelled."
        client.set_flow_run_state(running, Cancelled(), force=True)  # its worker stopped it
        waiter.join(timeout=30)
        [outcomes] = result
        assert [(o.runs, o.state) for o in outcomes] == [(("partition-0-of-2",), "Cancelled")]
        # A partition that crashes while its fan-out is being cancelled is not relaunched.
        assert wait_for_partitions.fn({1: lost}, lambda **kw: relaunched.append(kw), 2, poll_s=0.05)[0].state == (
            "Crashed"
        )
    assert relaunched == []


def test_waiting_is_bounded_and_cancels_what_is_left():
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    with get_client(sync_client=True) as client:
        done, stuck = _flow_run(client, Completed()), _flow_run(client, Running(), name=run_name(1, 2))
        outcomes = wait_for_partitions.fn({0: done, 1: stuck}, timeout_s=0.5, poll_s=0.1)
        assert client.read_flow_run(stuck).state.name in ("Cancelling", "Cancelled")
    assert outcomes[0].completed and not outcomes[1].completed
    with pytest.raises(ActcacheError, match=r"partition 1 \(partition-1-of-2\) Cancel.*timeout_s=0.5"):
        check_partitions.fn(outcomes)


def test_verify_sets_fails_on_missing_or_corrupted_shards(base_config):
    from actcache.flows.extract import extract_activations

    [url] = extract_activations(base_config)
    plan = make_plan(base_config, load_model=False)
    verify_sets.fn(plan)  # sound

    shard = next(Path(url).glob("shards/000002.*"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ActcacheError, match="shard 2.*checksum"):
        verify_sets.fn(plan)  # listed as done before the damage: the checksum catches it
    with pytest.raises(ActcacheError, match="1 shards are still missing"):
        verify_sets.fn(make_plan(base_config, load_model=False))  # a fresh plan sees the damaged shard as missing


def test_a_lost_partitions_task_runs_are_finalized_with_its_state():
    """Issue 22: a partition marked Crashed from outside leaves no task run Running (a completed one keeps its)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Completed, Crashed, Running

    lost = "No heartbeat for 90 s: the run's worker or node was lost."

    def task_states(client, run_id):
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return sorted((t.name, t.state.type.value) for t in runs)

    with get_client(sync_client=True) as client:
        runs = {}
        for index in (0, 1):
            run_id = _flow_run(client, Running(), name=run_name(index, 2))
            for name, state in (("extract-000001", Completed()), ("extract-000003", Running())):
                client.create_task_run(
                    task=wait_for_partitions, flow_run_id=run_id, dynamic_key=name, name=name, state=state
                )
            runs[index] = run_id
        client.set_flow_run_state(runs[0], Crashed(message=lost), force=True)
        client.set_flow_run_state(runs[1], Completed(), force=True)
        outcomes = wait_for_partitions.fn(runs, poll_s=0.05)
        assert [o.state for o in outcomes] == ["Crashed", "Completed"]
        assert task_states(client, runs[0]) == [("extract-000001", "COMPLETED"), ("extract-000003", "CRASHED")]
        # A completed partition is left as it is (its task runs are its own business).
        assert task_states(client, runs[1]) == [("extract-000001", "COMPLETED"), ("extract-000003", "RUNNING")]
