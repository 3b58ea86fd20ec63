"""Create (or update) the automation that marks lost flow runs Crashed. Run once per server, after deploying:

    PREFECT_API_URL=... python deployments/automations.py [--lost-after 90]

A flow run of these deployments sends a heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (set for
every run in prefect.yaml). When a node disappears (power, preemption, SIGKILL of the worker and its runs) nobody
reports the run's end and it would stay Running for good; this automation, Prefect's "zombie flow" detection,
marks it Crashed once no heartbeat came for --lost-after seconds, and the fan-out parent relaunches its partition.
It only watches runs tagged ``actcache`` (prefect.yaml's tags), so other flows on the server with other heartbeat
settings are left alone. Idempotent: rerun it after changing --lost-after.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

import yaml

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")
NAME = "actcache-lost-runs"
LOST_AFTER_S = 90
# What ends a run's heartbeats normally: its terminal states.
FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")


def deployment_settings() -> tuple[str, int]:
    """The tag every deployment carries and the heartbeat period every run gets, from prefect.yaml."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    [tag] = spec["definitions"]["tags"]
    periods = {
        int(d["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) for d in spec["deployments"]
    }
    [heartbeat_s] = periods
    return tag, heartbeat_s


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
        "(its node is gone); deployments/automations.py",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--lost-after",
        type=int,
        default=LOST_AFTER_S,
        metavar="SECONDS",
        help=f"mark a run Crashed after this long without a heartbeat (default {LOST_AFTER_S})",
    )
    args = parser.parse_args(argv)
    tag, heartbeat_s = deployment_settings()
    try:
        automation = lost_run_automation(args.lost_after, tag, heartbeat_s)
    except ValueError as e:
        parser.error(str(e))  # exit 2
    print(apply(automation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
