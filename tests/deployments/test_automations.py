"""deployments/automations.py: the lost-run automation follows prefect.yaml, refuses a window that would crash
healthy runs, and applying it twice leaves one automation (its effect on lost runs: test_lost_worker.py)."""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deployments" / "automations.py"


@pytest.fixture(scope="module")
def automations():
    spec = importlib.util.spec_from_file_location("actcache_deployment_automations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_automation_watches_heartbeats_of_tagged_runs_only(automations):
    tag, heartbeat_s = automations.deployment_settings()
    assert (tag, heartbeat_s) == ("actcache", 30)  # prefect.yaml: the deployments' tag, every run's heartbeat
    a = automations.lost_run_automation(90, tag, heartbeat_s)
    t = a.trigger
    assert t.after == {"prefect.flow-run.heartbeat"} and t.within == timedelta(seconds=90)
    assert t.expect == {
        "prefect.flow-run.heartbeat",
        "prefect.flow-run.Completed",
        "prefect.flow-run.Failed",
        "prefect.flow-run.Cancelled",
        "prefect.flow-run.Crashed",
    }
    assert t.for_each == {"prefect.resource.id"} and t.posture == "Proactive"
    assert t.match_related.root == {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.actcache"}
    [action] = a.actions
    assert action.type == "change-flow-run-state" and action.state == "CRASHED" and "90 s" in action.message


def test_a_window_under_two_heartbeats_is_refused(automations, capsys):
    with pytest.raises(ValueError, match="at least 60"):
        automations.lost_run_automation(45, "actcache", 30)
    with pytest.raises(SystemExit) as e:
        automations.main(["--lost-after", "45"])
    assert e.value.code == 2 and "use at least 60" in capsys.readouterr().err


def test_applying_twice_updates_the_one_automation(automations, prefect_harness):
    from prefect.client.orchestration import get_client

    first = automations.apply(automations.lost_run_automation(90, "actcache", 30))
    second = automations.apply(automations.lost_run_automation(120, "actcache", 30))
    assert first.startswith("created") and second.startswith("updated")
    with get_client(sync_client=True) as client:
        [a] = client.read_automations_by_name(automations.NAME)
    assert a.trigger.within == timedelta(seconds=120)


def test_the_action_never_overrides_a_final_state(automations, prefect_harness):
    """Issue 22: the automation acts only on runs still running: its action does not force, and Prefect refuses to
    move a Completed run to Crashed without force (what a late heartbeat would otherwise cause)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Crashed

    [action] = automations.lost_run_automation(90, "actcache", 30).actions
    assert action.force is False

    @flow(name="finished")
    def finished() -> None:
        pass

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(finished, state=Completed())
        result = client.set_flow_run_state(run.id, Crashed(message="late heartbeat"), force=action.force)
        assert result.status.value == "ABORT"
        assert client.read_flow_run(run.id).state.is_completed()


def test_deploy_installs_the_lost_run_automation(automations, prefect_harness):
    """Issue 22: prefect.yaml's build step (what `prefect deploy` runs) installs the automation, no separate step."""
    import yaml
    from prefect.client.orchestration import get_client

    [[(fqn, inputs)]] = [list(s.items()) for s in yaml.safe_load(automations.PREFECT_YAML.read_text())["build"]]
    assert fqn == "actcache.orchestration.automations.install"
    from actcache.orchestration.automations import install

    install(**inputs)
    install(**inputs)  # `deploy --all` runs it once per deployment: still one automation
    with get_client(sync_client=True) as client:
        [a] = client.read_automations_by_name(automations.NAME)
    assert a.trigger.within == timedelta(seconds=90)
    assert a.trigger.match_related.root["prefect.resource.id"] == "prefect.tag.actcache"


def test_a_lost_fanout_is_run_again_with_its_parameters_and_one_more_resume(automations):
    """The fanout deployment's trigger: on a Crashed run of extract-fanout, the same parameters, resumes + 1, and
    the lost run's id (the new run finalizes the task runs it left Running)."""
    import json
    from uuid import UUID

    import yaml
    from prefect.events import DeploymentTriggerTypes
    from prefect.server.utilities.user_templates import render_user_template_sync
    from pydantic import TypeAdapter

    spec = yaml.safe_load(automations.PREFECT_YAML.read_text())
    [fanout] = [d for d in spec["deployments"] if d["name"] == "fanout"]
    [trigger] = [TypeAdapter(DeploymentTriggerTypes).validate_python(t) for t in fanout["triggers"]]
    assert trigger.expect == {"prefect.flow-run.Crashed"} and trigger.posture == "Reactive"
    assert trigger.match_related.root == {"prefect.resource.role": "flow", "prefect.resource.name": "extract-fanout"}
    template = trigger.parameters["value"]["template"]
    assert trigger.parameters["__prefect_kind"] == "json"

    class Run:
        id = UUID("7f3c5a8e-0d6b-4c1e-9a2f-3b4c5d6e7f80")
        parameters = {"config": {"max_tokens": 64, "store": "s3://b/x"}, "num_partitions": 3}

    first = json.loads(render_user_template_sync(template, {"flow_run": Run()}))
    assert first == {**Run.parameters, "resumes": 1, "lost_run_id": str(Run.id)}
    Run.id, Run.parameters = UUID("0c1d2e3f-4a5b-4c6d-8e7f-8091a2b3c4d5"), first
    again = json.loads(render_user_template_sync(template, {"flow_run": Run()}))
    assert again["resumes"] == 2 and again["lost_run_id"] == str(Run.id)


def test_a_fanout_lost_too_often_is_not_resumed_again():
    from actcache.flows.fanout import extract_fanout

    state = extract_fanout.fn(num_partitions=2, max_relaunches=2, resumes=3)  # nothing planned, nothing launched
    assert state.is_failed() and "lost 3 times" in state.message
