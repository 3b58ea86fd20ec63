"""Create (or update) the automation that marks lost flow runs Crashed, with another window:

    PREFECT_API_URL=... python deployments/automations.py [--lost-after 90]

`prefect deploy --prefect-file deployments/prefect.yaml` already installs it (a build step) with the default
window; this changes the window (actcache.orchestration.automations says what it does). Idempotent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from actcache.orchestration.automations import LOST_AFTER_S, NAME, apply, lost_run_automation

__all__ = ["NAME", "apply", "deployment_settings", "lost_run_automation", "main"]

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")


def deployment_settings() -> tuple[str, int]:
    """The tag every deployment carries and the heartbeat period every run gets, from prefect.yaml."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    [tag] = spec["definitions"]["tags"]
    periods = {
        int(d["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) for d in spec["deployments"]
    }
    [heartbeat_s] = periods
    return tag, heartbeat_s


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
