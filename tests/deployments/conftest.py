"""Fixtures for the deployment tests: a real Prefect server (helpers in tests/prefect_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prefect_server import PREFECT, Processes, Server, free_port, server_env


@pytest.fixture(scope="module")
def server_settings() -> dict[str, str]:
    """Extra environment of the module's server, e.g. services it needs (a test module overrides this)."""
    return {}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, server_settings) -> Iterator[Server]:
    """``prefect server start`` on a free loopback port with its own PREFECT_HOME (SQLite inside it)."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = server_env(root / "home", url)
    env["ACTCACHE_CACHE_DIR"] = str(root / "cache")
    env.update(server_settings)
    procs = Processes(root)
    server = Server(url, env, procs)
    try:
        procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, root)
        yield server
    finally:
        survivors = procs.stop_all()
        assert not survivors, f"processes still alive after SIGKILL: {survivors}"
