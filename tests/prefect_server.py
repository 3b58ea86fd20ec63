"""A real Prefect server and real workers, started as subprocesses and always stopped by PID.

Used by the deployment tests and the lost-API fault test (import it as ``prefect_server``: tests/ is on
sys.path, see tests/conftest.py).

Workers can ignore SIGTERM, and they start each flow run in its own session, so stopping a process
means: snapshot its whole process tree, SIGTERM every process group in it, then SIGKILL what is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids[ppid].append(int(d))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pids: list[int], sig: int) -> None:
    """Signal each process and its process group (never the test's own group)."""
    ours = os.getpgid(0)
    for pid in pids:
        try:
            group = os.getpgid(pid)
            if group != ours:
                os.killpg(group, sig)
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Processes:
    """Every process a test starts, each in its own session, stopped together by PID."""

    logs: Path
    started: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.started.append((name, proc))
        return proc

    def log_tail(self, name: str, n: int = 40) -> str:
        lines = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop_all(self, grace_s: float = 8.0) -> list[int]:
        """Stop everything started (workers first, the server last); return PIDs that survived SIGKILL."""
        tree = [pid for _, proc in reversed(self.started) for pid in process_tree(proc.pid)]
        _signal(tree, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.2)
        _signal([p for p in tree if alive(p)], signal.SIGKILL)
        for _, proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.2)
        return [p for p in tree if alive(p)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    env: dict[str, str]
    procs: Processes

    def cli(self, *args: str, cwd: Path = REPO, timeout: float = 120) -> str:
        """Run the prefect CLI against this server; fail the test with its output on error."""
        res = subprocess.run([PREFECT, *args], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            pytest.fail(
                f"prefect {' '.join(args)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            )
        return res.stdout

    def python(self, *args: str, cwd: Path = REPO, timeout: float = 120) -> str:
        """Run a Python script (e.g. deployments/automations.py) against this server; fail the test on error."""
        res = subprocess.run(
            [sys.executable, *args], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        if res.returncode != 0:
            pytest.fail(f"python {' '.join(args)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return res.stdout

    def start_worker(
        self, name: str, pool: str, env: dict[str, str], cwd: Path, args: tuple[str, ...] = ()
    ) -> subprocess.Popen:
        return self.procs.start(name, [PREFECT, "worker", "start", "--pool", pool, "--name", name, *args], env, cwd)

    def wait_healthy(self, timeout_s: float = 120) -> None:
        """Return once GET /health answers; fail with the server's log if it exits or never does."""
        t0 = time.monotonic()
        proc = self.procs.started[0][1]
        while time.monotonic() - t0 < timeout_s:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited {proc.returncode}:\n{self.procs.log_tail('server')}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        pytest.fail(f"prefect server not healthy after {timeout_s} s:\n{self.procs.log_tail('server')}")


def server_env(home: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_UI_ENABLED": "false",
            # Services this test does not need; the scheduler only creates tomorrow's nightly runs.
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
            # A partition waiting for a deployment concurrency slot is retried after this many seconds (default 30).
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "3",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TQDM_DISABLE": "1",
        }
    )
    return env
