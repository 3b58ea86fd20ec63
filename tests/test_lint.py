"""The import rules in lint hold: Prefect (and the flows and tasks) only in actcache/orchestration, flows/ and
tasks/, and no test helper in anything that is installed; an import inside a function counts as much
as one at the top."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess  # ruff in a process of its own

ROOT = Path(__file__).resolve().parents[1]
PROBE = """\
def probe():
    from prefect.artifacts import create_markdown_artifact
    import prefect_aws.s3
    from tests import setwriter
    import hub_server
    from actcache.flows.extract import extract_activations
    import actcache.tasks.compress

    return create_markdown_artifact, prefect_aws, setwriter, hub_server, extract_activations, actcache
"""


def _banned(path: str) -> set[str]:
    """The modules ruff reports as banned (TID251) in PROBE as if it were the file ``path`` of the repository,
    with the repository's own settings (which select the rule)."""
    p = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--output-format", "concise", "--stdin-filename", path, "-"],
        input=PROBE,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert p.returncode in (0, 1), p.stderr
    return {line.split("`")[1] for line in p.stdout.splitlines() if "TID251" in line}


@pytest.mark.parametrize(
    "path,banned",
    [
        ("actcache/api.py", {"prefect", "prefect_aws", "tests", "hub_server", "actcache.flows", "actcache.tasks"}),
        (
            "actcache/format/probe.py",
            {"prefect", "prefect_aws", "tests", "hub_server", "actcache.flows", "actcache.tasks"},
        ),
        ("actcache/orchestration/probe.py", {"tests", "hub_server"}),
        ("flows/probe.py", {"tests", "hub_server"}),
        ("tasks/probe.py", {"tests", "hub_server"}),
        ("tests/actcache/test_probe.py", set()),
        ("bench/probe.py", set()),
        ("deployments/probe.py", set()),
    ],
)
def test_banned_imports(path, banned):
    assert _banned(path) == banned
