"""Writer leases: renewed while held, gone when released, and a lease found gone stops the writer's next write."""

from __future__ import annotations

import os
import time

import pytest

from actcache.errors import Failure
from actcache.format import layout
from actcache.format.commit import commit
from actcache.storage import leases
from actcache.storage.store import Store

SET_ID = "cd" * 12


def _lease_files(root) -> list:
    return sorted((root / SET_ID / layout.WRITERS).glob("*.json")) if (root / SET_ID / layout.WRITERS).exists() else []


def test_a_held_lease_is_renewed_then_removed_with_the_folders_it_made(tmp_path, monkeypatch):
    monkeypatch.setattr(leases, "RENEW_S", 0.05)
    store = Store(str(tmp_path))
    with leases.hold(store, SET_ID):
        (path,) = _lease_files(tmp_path)
        old = time.time() - 3600
        os.utime(path, (old, old))
        deadline = time.monotonic() + 30
        while path.stat().st_mtime < time.time() - 60:
            assert time.monotonic() < deadline, "never renewed"
            time.sleep(0.05)
        (found,) = leases.live(store, SET_ID)
        assert found.same_host and found.pid == os.getpid() and found.age < 60
    assert not (tmp_path / SET_ID).exists()


def test_a_writer_whose_lease_is_gone_writes_nothing_more(tmp_path, monkeypatch):
    """The set deleted under a writer (by hand, or by an rm that listed it before the lease was taken): the next
    write of the writer, through ``commit``, stops in one line and writes nothing; the renewal thread notices too."""
    monkeypatch.setattr(leases, "RENEW_S", 0.05)
    store = Store(str(tmp_path))
    with leases.hold(store, SET_ID):
        (path,) = _lease_files(tmp_path)
        path.unlink()
        (held,) = leases._HELD[(store.url, SET_ID)]
        deadline = time.monotonic() + 30
        while not held.lost:  # the renewal thread finds it gone, and never writes it again
            assert time.monotonic() < deadline, "the renewal never noticed"
            time.sleep(0.05)
        assert not path.exists()
        with pytest.raises(
            Failure, match="was removed while this command wrote it .*stopped without writing its manifest"
        ):
            commit(store, SET_ID, manifest_doc={"shards": []})
        assert not (tmp_path / SET_ID / layout.MANIFEST).exists()
    assert not (tmp_path / SET_ID).exists() or not [p for p in (tmp_path / SET_ID).rglob("*") if p.is_file()]


def test_commit_without_a_lease_is_unchanged(tmp_path):
    """Only a process that holds a lease on the set checks it: other callers of commit write as before."""
    store = Store(str(tmp_path))
    commit(store, SET_ID, manifest_doc={"shards": []})
    assert (tmp_path / SET_ID / layout.MANIFEST).exists() and not _lease_files(tmp_path)


def test_a_writer_sweeps_the_lease_of_a_killed_writer_whose_pid_another_process_holds(tmp_path):
    """The crash tests' rerun found a killed writer's lease kept: its pid had gone to another process (pids wrap on
    a busy host). The lease names the process's start too; a later process under the same pid is not the writer."""
    from actcache.storage.housekeeping import _HOST, me

    pid, start = me()
    if start is None:
        pytest.skip("this host does not say when a process started")
    killed = tmp_path / SET_ID / layout.writer_file(_HOST, pid, "0badf00d", start - 1)
    killed.parent.mkdir(parents=True)
    killed.write_text("{}")
    store = Store(str(tmp_path))
    assert [le.live for le in leases.leases(store, SET_ID)] == [False]
    with leases.hold(store, SET_ID):
        (path,) = _lease_files(tmp_path)
        assert path != killed and layout.parse_writer_file(f"{layout.WRITERS}/{path.name}") == (_HOST, pid, start)
        assert [le.live for le in leases.leases(store, SET_ID)] == [True]
    assert not _lease_files(tmp_path), "the killed writer's lease is swept, this one's released"


def test_a_lease_this_process_failed_to_delete_is_over(tmp_path, monkeypatch):
    """CI: the store was unreachable as a run ended, so its lease stayed; the rerun in the same process kept it (its
    pid and start are this process's, which runs), and the set held it for good. A lease of this process that it no
    longer holds is over: the next writer sweeps it, and rm does not take it for a writer."""
    from actcache.sets.cleanup import find_set

    store = Store(str(tmp_path))
    gone = store.remove
    with leases.hold(store, SET_ID):
        (left,) = _lease_files(tmp_path)
        assert [le.live for le in leases.leases(store, SET_ID)] == [True]
        monkeypatch.setattr(store, "remove", lambda rels: (_ for _ in ()).throw(OSError("endpoint down")))
    monkeypatch.setattr(store, "remove", gone)
    assert _lease_files(tmp_path) == [left]
    assert [le.live for le in leases.leases(store, SET_ID)] == [False]
    with leases.hold(store, SET_ID):
        assert left not in _lease_files(tmp_path) and len(_lease_files(tmp_path)) == 1
    assert not _lease_files(tmp_path)

    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_text("{}")
    find_set(store, SET_ID)  # rm's look: not refused, no writer holds the set


def test_a_lease_being_taken_is_held_before_it_exists(tmp_path, monkeypatch):
    """Another thread of this process sweeping the set just as a lease is written must not take it for over."""
    store = Store(str(tmp_path))
    write = store.write_bytes

    def written_then_swept(rel, data):
        write(rel, data)
        leases.sweep(store, SET_ID)  # the other thread's sweep, between the write and the registration

    monkeypatch.setattr(store, "write_bytes", written_then_swept)
    with leases.hold(store, SET_ID):
        (held,) = leases._HELD[(store.url, SET_ID)]
        assert len(_lease_files(tmp_path)) == 1 and held.lost is False
        leases.check(store, SET_ID)
