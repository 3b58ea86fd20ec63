"""kill -9 at seeded points in every stage, then rerun: the set equals an uninterrupted run's, bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
from cliargs import PROCESS, extract_argv
from prefect_server import PREFECT, Processes, Server, free_port, server_env
from setfiles import local_tree

from actcache import crashpoints
from actcache.read.reader import open_set

pytestmark = [pytest.mark.prefect, pytest.mark.subprocess]  # a real Prefect server and CLI runs

# How often each point is reached in one run of `args` below (4 shards): the seeded n stays in range.
_REACHED = {p: 4 for p in crashpoints.POINTS} | {
    "store.temp-written": 17,
    "manifest.before-write": 1,
    "manifest.written": 1,
}


def _cases(seed: int = 20261125, n: int = 11) -> list[tuple[str, int]]:
    """Every point at least once, then seeded extras; the n-th visit of each point is seeded too."""
    rng = random.Random(seed)
    points = list(crashpoints.POINTS) + [rng.choice(crashpoints.POINTS) for _ in range(n - len(crashpoints.POINTS))]
    return [(p, rng.randint(1, _REACHED[p])) for p in points]


CASES = _cases()


@pytest.fixture(scope="module")
def api_env(tmp_path_factory):
    """One real Prefect server for every run here: no temporary server per process, none orphaned by a kill."""
    root = tmp_path_factory.mktemp("prefect")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**server_env(root / "home", url), "ACTCACHE_CACHE_DIR": os.environ["ACTCACHE_CACHE_DIR"]}
    procs = Processes(root)
    try:
        procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, root)
        Server(url, env, procs).wait_healthy()
        yield env
    finally:
        assert not procs.stop_all()


@pytest.fixture(scope="module")
def args(tiny_models, corpus):
    return extract_argv(tiny_models["gpt2"], corpus, None, hook="blocks.1.hook_resid_post", codec="zstd")


def _run(args: list[str], store: Path, env: dict[str, str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(env)
    env.pop("ACTCACHE_FAULT", None)
    if fault:
        env["ACTCACHE_FAULT"] = fault
    argv = [*PROCESS, *args, "--store", str(store)]
    # Own session, and the group killed once the CLI has exited: nothing it started may outlive it.
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        proc.wait(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture(scope="module")
def reference(args, api_env, tmp_path_factory):
    store = tmp_path_factory.mktemp("reference")
    proc = _run(args, store, api_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return local_tree(store)


def test_cases_cover_every_stage():
    assert len(CASES) >= 10 and {p for p, _ in CASES} == set(crashpoints.POINTS)


@pytest.mark.parametrize("point,nth", CASES, ids=[f"{p}:{n}" for p, n in CASES])
def test_kill_then_rerun_gives_the_same_set(args, api_env, reference, tmp_path, point, nth):
    store = tmp_path / "store"
    killed = _run(args, store, api_env, f"{point}:{nth}")
    assert killed.returncode == -signal.SIGKILL, f"never reached {point}:{nth}\n{killed.stderr[-2000:]}"

    rerun = _run(args, store, api_env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    url = rerun.stdout.strip().splitlines()[-1]
    assert open_set(url).verify() == []
    assert local_tree(store) == reference, "no temp file, no stale shard, nothing missing"
