"""Prefect's temporary server, started in the background: used by the CLI, gone with it, and never in the way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cliargs import PROCESS, extract_argv

from actcache.errors import ActcacheError
from actcache.orchestration import tempserver

CREATE_APP = "prefect.server.api.server:create_app"


def _isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """No Prefect API configured anywhere: a fresh PREFECT_HOME and no PREFECT_* variables from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        TQDM_DISABLE="1",
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
        **extra,
    )
    return env


def _servers_for(home: Path) -> list[int]:
    """PIDs of Prefect API servers whose PREFECT_HOME is ``home``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if CREATE_APP.encode() in (d / "cmdline").read_bytes() and f"PREFECT_HOME={home}".encode() in (
                d / "environ"
            ).read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cli_uses_the_background_server_and_leaves_none_behind(tiny_models, corpus, tmp_path):
    home = tmp_path / "prefect-home"
    store = tmp_path / "store"
    proc = subprocess.run(
        [*PROCESS, *extract_argv(tiny_models["gpt2"], corpus, store, max_tokens=256)],
        capture_output=True,
        text=True,
        env=_isolated_env(home),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    set_url = proc.stdout.strip().splitlines()[-1]
    assert (Path(set_url) / "manifest.json").exists()
    # Prefect did not start a second server of its own: it logs this line when it does.
    assert "Starting temporary server" not in proc.stderr
    assert "Error flushing" not in proc.stderr  # the server's shutdown noise goes to its own log
    assert _servers_for(home) == []


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_with_its_process_even_on_sigkill(tmp_path):
    home = tmp_path / "prefect-home"
    code = (
        "import sys, time\nfrom actcache.orchestration import tempserver\ntempserver.start()\n"
        "print(tempserver._SERVER.wait(120), flush=True)\ntime.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_isolated_env(home), start_new_session=True
    )
    try:
        url = parent.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
        (server,) = _servers_for(home)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert _gone(server, timeout=15), "the temporary server outlived its process"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
        for pid in _servers_for(home):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.subprocess
def test_a_server_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    for k in [k for k in os.environ if k.startswith("PREFECT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "NOT-A-LEVEL")  # the server process fails while importing Prefect
    server = tempserver.TemporaryServer()
    try:
        with pytest.raises(ActcacheError) as e:
            server.wait(120)
    finally:
        server.stop()
    msg = str(e.value)
    assert "\n" not in msg and "temporary server exited with status" in msg and "PREFECT_API_URL" in msg


def test_a_configured_api_wins(prefect_harness, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(tempserver, "_SERVER", None)
    tempserver.start()  # the harness configures an API through Prefect's settings: nothing to start
    assert tempserver._SERVER is None

    started = tempserver.TemporaryServer()  # as if started before the API was configured
    monkeypatch.setattr(tempserver, "_SERVER", started)
    with tempserver.prefect_api():
        from prefect.settings import PREFECT_API_URL

        assert PREFECT_API_URL.value() != started.api_url
    assert started.proc.poll() is not None and tempserver._SERVER is None
