"""The Prefect API goes away mid-run: the run fails with one line, and the rerun loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cliargs import PROCESS, extract_argv
from prefect_server import PREFECT, Processes, Server, free_port, process_tree, server_env

from actcache.read.reader import open_set

pytestmark = [pytest.mark.prefect, pytest.mark.subprocess]  # a real Prefect server and CLI runs


def _start_server(procs: Processes, server: Server, port: int, home: Path) -> subprocess.Popen:
    proc = procs.start(
        f"server-{len(procs.started)}",
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        server.env,
        home,
    )
    procs.started.insert(0, procs.started.pop())  # wait_healthy watches the newest server
    server.wait_healthy()
    return proc


def _kill_tree(pid: int) -> None:
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_lost_api_then_rerun(tmp_path, tiny_models, corpus):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **server_env(tmp_path / "home", url),
        "ACTCACHE_CACHE_DIR": os.environ["ACTCACHE_CACHE_DIR"],
        "PREFECT_CLIENT_MAX_RETRIES": "2",
    }
    procs = Processes(tmp_path)
    server = Server(url, env, procs)
    store = tmp_path / "store"
    argv = [*PROCESS, *extract_argv(tiny_models["gpt2"], corpus, store, max_tokens=8192, batch_size=4, device=None)]
    try:
        first = _start_server(procs, server, port, tmp_path)
        run = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while len(list(store.glob("*/done/*.json"))) < 3:  # mid-run: some shards stored, most not
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before the API was cut"
            time.sleep(0.05)
        _kill_tree(first.pid)
        try:
            _, err = run.communicate(timeout=300)
        finally:
            _kill_tree(run.pid)
        assert run.returncode not in (0, None)
        last = err.strip().splitlines()[-1]
        assert last.startswith("actcache: error: lost the Prefect API"), err[-3000:]
        kept = {p: p.stat().st_mtime_ns for p in store.glob("*/shards/*")}
        assert 3 <= len(kept) < 64

        _start_server(procs, server, port, tmp_path)
        rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        s = open_set(rerun.stdout.strip().splitlines()[-1])
        assert len(s) == 64 and s.verify() == []
        assert {p: p.stat().st_mtime_ns for p in kept} == kept, "shards stored before the outage are kept as is"
        done = json.loads((Path(s.url) / "manifest.json").read_text())["n_shards"]
        assert done == 64
    finally:
        survivors = procs.stop_all()
        assert not survivors
