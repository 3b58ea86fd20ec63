"""A writer of this host is judged by its pid and its process's start: a later process given the same pid (pids wrap
within minutes on a busy host) is not taken for the writer, whose temp files and leases are then garbage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from actcache.format import layout
from actcache.storage import housekeeping
from actcache.storage.housekeeping import _HOST, _alive, me, process_start
from actcache.storage.store import Store

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times come from /proc")


@pytest.mark.subprocess
def test_a_process_is_named_by_its_pid_and_start():
    pid, start = me()
    assert pid == os.getpid() and start == process_start(pid) and isinstance(start, int)
    assert _alive(pid, start) and _alive(pid)  # a name without a start (actcache before 0.7.1): by pid alone
    assert not _alive(pid, start + 1), "another process that held this pid before is not this one"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        child_start = process_start(child.pid)
        assert child_start is not None and child_start >= start and _alive(child.pid, child_start)
    finally:
        child.kill()
        child.wait()
    assert not _alive(child.pid, child_start) and process_start(child.pid) is None


def test_a_thread_id_is_not_a_writer():
    """kill(2) accepts a thread's id as the process's: a writer's pid given to a thread of another process reads
    as alive by pid alone; the thread's own start time tells them apart."""
    got = {}
    ready, done = threading.Event(), threading.Event()

    def run():
        got["tid"] = threading.get_native_id()
        ready.set()
        done.wait(30)

    t = threading.Thread(target=run)
    t.start()
    try:
        ready.wait(30)
        tid = got["tid"]
        assert _alive(tid), "by pid alone the thread passes for a process"
        assert process_start(tid) is not None
        assert not _alive(tid, me()[1] - 1)
    finally:
        done.set()
        t.join()


def test_temp_files_of_a_pid_now_held_by_another_process_are_a_dead_writers(tmp_path):
    pid, start = me()
    shards = tmp_path / ("ab" * 12) / "shards"
    shards.mkdir(parents=True)
    names = {
        "mine": layout.temp_name("000001.safetensors", _HOST, pid, "0badf00d", start),
        "reused": layout.temp_name("000002.safetensors", _HOST, pid, "0badf00d", start - 1),
        "unknown start": layout.temp_name("000003.safetensors", _HOST, pid, "0badf00d"),
    }
    for name in names.values():
        (shards / name).write_bytes(b"x")
    dead = {os.path.basename(t.rel): t.writer_dead for t in housekeeping.temp_files(Store(str(tmp_path)))}
    assert dead == {names["mine"]: False, names["reused"]: True, names["unknown start"]: False}


def test_forked_child_names_itself():
    r, w = os.pipe()
    parent = me()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(w, json.dumps(me()).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    got = json.loads(os.read(r, 100))
    os.close(r)
    assert got[0] == child != parent[0] and got[1] is not None
