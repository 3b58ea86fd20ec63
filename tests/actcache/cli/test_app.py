"""The command itself: `python -m actcache`, and a quiet start (no telemetry notice off a terminal)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.subprocess
def test_telemetry_notice_stays_off_a_terminal(tmp_path):
    """Prefect prints its telemetry notice on import when stdout/stderr is a terminal; the CLI's defaults stop it."""
    import pty

    ci = {
        "CI",
        "GITHUB_ACTIONS",
        "GITLAB_CI",
        "JENKINS_URL",
        "TRAVIS",
        "CIRCLECI",
        "BUILDKITE",
        "TF_BUILD",
        "CODEBUILD_BUILD_ID",
        "BITBUCKET_COMMIT",
        "TEAMCITY_VERSION",
        "DRONE",
        "SEMAPHORE",
        "APPVEYOR",
        "BUDDY",
        "CI_NAME",
    }  # Prefect stays quiet in CI by itself: a CI variable would hide the notice from the control

    def on_a_terminal(code: str, home: str) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ci and k != "DO_NOT_TRACK"}
        env.update(PREFECT_HOME=str(tmp_path / home), PYTHONWARNINGS="ignore")
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True
        )
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=120)
        os.close(leader)
        return out.decode(errors="replace")

    assert "anonymous usage data" in on_a_terminal("import prefect", "control")  # the notice exists
    assert "anonymous usage data" not in on_a_terminal(
        "from actcache.cli import app as cli; cli._quiet_defaults(); import prefect", "cli"
    )


"""Modules that take seconds to import here (torch alone ~2 s): none is needed to read JSON and hash bytes."""


@pytest.mark.subprocess
def test_python_dash_m_actcache_is_the_command(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "actcache", "ls", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0 and "no sets" in (p.stdout + p.stderr).lower(), (p.stdout, p.stderr)
