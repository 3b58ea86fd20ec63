"""tests/postgres.py: the PostgreSQL cluster the deployment tests' Prefect servers use."""

from __future__ import annotations

import asyncio
import os

import postgres
import pytest
from prefect_server import free_port

pytestmark = [
    pytest.mark.subprocess,  # a PostgreSQL cluster (and a Prefect server) of its own
    pytest.mark.skipif(postgres.find_bin() is None, reason=postgres.absent_reason()),
]


def test_cluster_on_loopback_unprivileged_and_removed():
    cluster = postgres.start(free_port())
    try:
        url = cluster.create_database("prefect_probe")
        assert url == f"postgresql+asyncpg://postgres@127.0.0.1:{cluster.port}/prefect_probe"
        import asyncpg

        async def ask():
            conn = await asyncpg.connect(host="127.0.0.1", port=cluster.port, user="postgres", database="prefect_probe")
            try:
                return await conn.fetchrow("SHOW listen_addresses"), await conn.fetchval("SHOW server_version_num")
            finally:
                await conn.close()

        (listen,), version = asyncio.run(ask())
        assert listen == "127.0.0.1" and int(version) >= 130000
        pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
        assert os.stat(f"/proc/{pid}").st_uid != 0, "the server must not run as root"
    finally:
        cluster.stop()
    assert not cluster.root.exists()


def test_a_prefect_server_on_the_cluster_keeps_its_state_there(tmp_path):
    """What the deployment tests rely on: the server's tables are in PostgreSQL, no SQLite file is made."""
    import asyncpg
    from prefect_server import PREFECT, Processes, Server, server_env

    cluster = postgres.start(free_port())
    procs = Processes(tmp_path)
    try:
        port = free_port()
        env = server_env(tmp_path / "home", f"http://127.0.0.1:{port}/api")
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = cluster.create_database("prefect_probe")
        server = Server(env["PREFECT_API_URL"], env, procs)
        procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path)
        server.wait_healthy()
        server.cli("work-pool", "create", "probe-pool", "--type", "process")

        async def pools():
            conn = await asyncpg.connect(host="127.0.0.1", port=cluster.port, user="postgres", database="prefect_probe")
            try:
                return [r["name"] for r in await conn.fetch("SELECT name FROM work_pool")]
            finally:
                await conn.close()

        assert "probe-pool" in asyncio.run(pools())
        assert not list((tmp_path / "home").glob("*.db"))
    finally:
        assert not procs.stop_all()
        cluster.stop()
