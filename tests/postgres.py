"""A throwaway PostgreSQL cluster for the tests' Prefect servers, from this machine's own server binaries.

The deployment tests run Prefect on PostgreSQL, as the compose file and production do: SQLite serialises every
write, and under workers' heartbeats and several flow runs it answers ``database is locked``. The cluster
lives in a temporary directory, listens on 127.0.0.1 only (no Unix socket outside that directory), trusts
local connections (nothing else can reach it), and is stopped and deleted afterwards. ``initdb`` refuses to
run as root, so as root the server runs as the ``postgres`` account (or ``nobody``) via ``setpriv``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PG_BIN_ENV = "ACTCACHE_PG_BIN"
"""A folder with initdb and pg_ctl, when they are not under /usr/lib/postgresql/*/bin or on PATH."""


def find_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: $ACTCACHE_PG_BIN, the newest /usr/lib/postgresql/N/bin, or PATH."""
    candidates = [os.environ.get(PG_BIN_ENV, "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    initdb = shutil.which("initdb")
    candidates.append(str(Path(initdb).parent) if initdb else "")
    for folder in filter(None, candidates):
        if all(os.access(Path(folder) / exe, os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def absent_reason() -> str:
    return (
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under /usr/lib/postgresql/*/bin, "
        f"on PATH or in ${PG_BIN_ENV}: install postgresql to run the deployment tests on it"
    )


@dataclass
class Cluster:
    bin: Path
    root: Path
    port: int
    prefix: list[str]
    """How to run a server binary: setpriv to an unprivileged account when this process is root."""

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL Prefect takes (PREFECT_API_DATABASE_CONNECTION_URL), asyncpg driver."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, exe: str, *args: str, timeout: float = 120) -> str:
        res = subprocess.run(
            [*self.prefix, str(self.bin / exe), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C", "PGTZ": "UTC"},
            cwd=self.root,
        )
        if res.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{exe} exited {res.returncode}: {res.stdout[-1500:]}{res.stderr[-1500:]}\n{tail}")
        return res.stdout

    def create_database(self, name: str) -> str:
        self.run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-qc", f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _unprivileged() -> tuple[list[str], int | None, int | None]:
    """(command prefix, uid, gid) to run the server binaries as someone other than root."""
    if os.geteuid() != 0:
        return [], None, None
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        setpriv = shutil.which("setpriv")
        if setpriv:
            return (
                [setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"],
                pw.pw_uid,
                pw.pw_gid,
            )
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", name, "--"], pw.pw_uid, pw.pw_gid
    raise RuntimeError("running as root with neither setpriv nor runuser nor a postgres/nobody account")


def start(port: int) -> Cluster:
    """initdb + pg_ctl start in a new temporary directory; the caller stops it (``Cluster.stop``)."""
    folder = find_bin()
    if folder is None:
        raise FileNotFoundError(absent_reason())
    prefix, uid, gid = _unprivileged()
    # Not under pytest's tmp_path: its parents are private to root, and the server may run as another user.
    root = Path(tempfile.mkdtemp(prefix="actcache-pg-"))
    if uid is not None:
        os.chown(root, uid, gid)
    cluster = Cluster(folder, root, port, prefix)
    try:
        cluster.run("initdb", "-D", str(cluster.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
        cluster.run("pg_ctl", "-D", str(cluster.data), "-o", options, "-l", str(root / "server.log"), "-w", "start")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster
