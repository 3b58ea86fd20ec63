"""The automation that marks lost flow runs Crashed, installed by `prefect deploy` (a build step of
deployments/prefect.yaml) and by deployments/automations.py (to change its window).

A flow run of the deployments sends a heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (set for
every run in prefect.yaml). When a node disappears (power, preemption, SIGKILL of the worker and its runs) nobody
reports the run's end and it would stay Running for good; this automation, Prefect's "zombie flow" detection,
marks it Crashed once no heartbeat came for ``lost_after_s`` seconds: the fan-out parent relaunches a lost
partition, and the fanout deployment's trigger (prefect.yaml) resumes a lost parent. It only watches runs tagged
``actcache`` (prefect.yaml's tags), so other flows on the server with other heartbeat settings are left alone.
Idempotent: applying it again updates the one automation of its name.
"""

from __future__ import annotations

from datetime import timedelta

NAME = "actcache-lost-runs"
LOST_AFTER_S = 90
# What ends a run's heartbeats normally: its terminal states.
FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")


def lost_run_automation(lost_after_s: int, tag: str, heartbeat_s: int):
    """Prefect's documented zombie detection, limited to runs tagged ``tag``."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if lost_after_s < 2 * heartbeat_s:
        raise ValueError(
            f"--lost-after {lost_after_s} is under twice the heartbeat period ({heartbeat_s} s, "
            f"prefect.yaml): one late heartbeat would crash a healthy run; use at least {2 * heartbeat_s}"
        )
    return AutomationCore(
        name=NAME,
        description=f"Mark a flow run tagged {tag!r} Crashed when it sent no heartbeat for {lost_after_s} s "
        "(its node is gone); actcache.orchestration.automations",
        trigger=EventTrigger(
            # After each heartbeat of a run, expect another one, or its end, within lost_after_s.
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in FINAL_EVENTS)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=lost_after_s),
        ),
        actions=[
            # force=False: Prefect's orchestration refuses to move a run out of a final state, so the action only
            # ever changes a run still Running. (A heartbeat event that arrives after a run's Completed event
            # arms the trigger again; the action then fails with "already in terminal state" and changes nothing.)
            ChangeFlowRunState(
                force=False,
                state=StateType.CRASHED,
                name="Crashed",
                message=f"No heartbeat for {lost_after_s} s: the run's worker or node was lost (automation {NAME!r}).",
            )
        ],
    )


def apply(automation) -> str:
    """Create the automation, or update the one of the same name; say which."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(automation.name)
        for extra in existing[1:]:  # duplicates from `prefect automation create` by hand
            client.delete_automation(extra.id)
        if existing:
            client.update_automation(existing[0].id, automation)
            return f"updated automation {automation.name!r} ({existing[0].id})"
        return f"created automation {automation.name!r} ({client.create_automation(automation)})"


def install(tags: list[str], heartbeat_s: int | str, lost_after_s: int | str = LOST_AFTER_S) -> dict[str, str]:
    """A `prefect deploy` build step (deployments/prefect.yaml): create or update the automation for the
    deployments' tag and heartbeat period, so that deploying installs it, no separate step."""
    [tag] = tags
    message = apply(lost_run_automation(int(lost_after_s), tag, int(heartbeat_s)))
    print(message)  # noqa: T201 - the step's line in `prefect deploy`'s output
    return {"automation": message}
