"""Fixtures for the deployment tests: a real Prefect server (helpers in tests/prefect_server.py) on PostgreSQL.

The server runs on its own PostgreSQL database, as the compose file and production do (tests/postgres.py starts a
cluster from this machine's binaries once per session; the tests skip, saying so, where those are absent).
``ACTCACHE_TEST_PREFECT_DB=sqlite`` runs them on SQLite instead, the quick local path.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import postgres
import pytest
from prefect_server import PREFECT, Processes, Server, free_port, server_env

_DATABASES = itertools.count()


@pytest.fixture(scope="module")
def server_settings() -> dict[str, str]:
    """Extra environment of the module's server, e.g. services it needs (a test module overrides this)."""
    return {}


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[postgres.Cluster | None]:
    """One PostgreSQL cluster for the session's Prefect servers (None: SQLite was asked for)."""
    if os.environ.get("ACTCACHE_TEST_PREFECT_DB") == "sqlite":
        yield None
        return
    if postgres.find_bin() is None:
        pytest.skip(postgres.absent_reason() + " (or set ACTCACHE_TEST_PREFECT_DB=sqlite)")
    cluster = postgres.start(free_port())
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, server_settings, postgres_cluster) -> Iterator[Server]:
    """``prefect server start`` on a free loopback port with its own PREFECT_HOME and its own PostgreSQL
    database (or SQLite inside PREFECT_HOME with ACTCACHE_TEST_PREFECT_DB=sqlite)."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = server_env(root / "home", url)
    env["ACTCACHE_CACHE_DIR"] = str(root / "cache")
    if postgres_cluster is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = postgres_cluster.create_database(f"prefect_{next(_DATABASES)}")
    env.update(server_settings)
    procs = Processes(root)
    server = Server(url, env, procs)
    try:
        procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, root)
        yield server
    finally:
        survivors = procs.stop_all()
        assert not survivors, f"processes still alive after SIGKILL: {survivors}"
