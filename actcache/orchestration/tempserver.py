"""Prefect's temporary API server, started first thing so it boots while torch imports and the model loads.

With no Prefect API configured, Prefect starts a temporary server when the first flow runs: it imports its
server code in this process, then waits for the subprocess to answer, all after the model has loaded (figures:
bench/RESULTS.md, "Cold start"). ``start()`` launches the same server (the command Prefect's ``SubprocessASGIServer``
runs) without importing Prefect, and the flow waits for it only when it is about to run. The server's own
log goes to a file (its shutdown noise is not the user's business) and it dies with this process, even on
SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from actcache.errors import ActcacheError

PORT_IN_USE_EXIT = 3  # uvicorn's exit status when it cannot bind (and when the app fails to start)
_LOCK = threading.Lock()
_SERVER: TemporaryServer | None = None


def _die_with_parent(parent: int) -> None:
    """In the forked child: SIGTERM when the parent dies (the main thread forks, so 'parent' is the process)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryServer:
    def __init__(self) -> None:
        self.log = tempfile.TemporaryFile(prefix="actcache-prefect-server-")  # unlinked: nothing left after SIGKILL
        self.ready, self.launches = False, 0
        self._launch()
        atexit.register(self.stop)

    def _launch(self) -> None:
        self.launches += 1
        self.port = _free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        parent = os.getpid()
        on_linux = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: _die_with_parent(parent)) if on_linux else None,
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self, timeout: float) -> str:
        """Block until the server answers its health check; return its API URL."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while not self.ready:
            code = self.proc.poll()
            if code == PORT_IN_USE_EXIT and self.launches < 3:  # lost a race for the port? try another
                self._launch()
            elif code is not None:
                raise ActcacheError(
                    f"Prefect's temporary server exited with status {code} ({self._last_log_line()}); "
                    "set PREFECT_API_URL to a running Prefect server"
                )
            elif time.monotonic() > deadline:
                self.stop()
                raise ActcacheError(
                    f"Prefect's temporary server did not answer within {timeout:.0f} s; raise "
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL to a "
                    "running Prefect server"
                )
            else:
                try:
                    with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                        self.ready = r.status == 200
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
            if not self.ready:
                time.sleep(0.1)
        return self.api_url

    def _last_log_line(self) -> str:
        try:
            self.log.seek(0)
            lines = [ln.strip() for ln in self.log.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        except (OSError, ValueError):
            return "no log"
        return lines[-1][:200] if lines else "no output"

    def stop(self) -> None:
        proc, self.ready = self.proc, False
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log.close()


def api_configured() -> bool:
    """Whether an API is configured, as far as can be told without importing Prefect (prefect_api() checks fully)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    settings = sys.modules.get("prefect.settings")  # already imported: free to ask (profiles, test harnesses)
    return bool(settings is not None and settings.PREFECT_API_URL.value())


def start() -> None:
    """Start the temporary server in the background unless a Prefect API is configured (idempotent, cheap)."""
    global _SERVER
    with _LOCK:
        if _SERVER is None and not api_configured():
            _SERVER = TemporaryServer()


def will_start() -> bool:
    """Whether the next flow runs on the temporary server (started here, and not yet answering)."""
    return _SERVER is not None and not _SERVER.ready


@contextlib.contextmanager
def prefect_api() -> Iterator[bool]:
    """Run the enclosed flow against the background server, or whatever API Prefect is configured with; yields
    whether that is the temporary server (its runs, and any link to them, end with this process).

    Prefect's own settings decide (profiles, .env, prefect.toml): where they name an API or forbid a temporary
    server, the background one is stopped unused.
    """
    global _SERVER
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    with _LOCK:
        server = _SERVER
        if server is not None and (PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value()):
            server.stop()
            server = _SERVER = None
    if server is None:
        # No URL and no server of ours: Prefect starts its own temporary one.
        yield not PREFECT_API_URL.value()
        return
    url = server.wait(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield True


def run_url(state: Any) -> str | None:
    """Where the UI shows the run that produced ``state`` (a server that outlives this process)."""
    try:
        from prefect.settings import PREFECT_UI_URL

        ui, run_id = PREFECT_UI_URL.value(), state.state_details.flow_run_id
    except Exception:
        return None
    return f"{ui.rstrip('/')}/runs/flow-run/{run_id}" if ui and run_id else None
