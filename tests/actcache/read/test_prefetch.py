"""Reading ahead: loads in flight bounded by the depth, errors reaching the consumer, S3 reads retried after a
transient failure and not after a permanent one."""

from __future__ import annotations

import threading

import pytest
from readback import full, reference, rows_of, settled

from actcache.errors import ActcacheError
from actcache.read import prefetch
from actcache.read.dataset import ActivationDataset, background, prefetched
from actcache.sets.copy import copy_set


# -- S3 prefetch and retries ----------------------------------------------------------------------------
def test_s3_reads_are_retried_after_a_transient_failure(local_set, restartable_s3, monkeypatch):
    """The endpoint dies after the dataset opened the set: reads fail with connection errors, are retried,
    and the epoch completes once it is back (restarted with its objects during the first retry's wait)."""
    for k, v in restartable_s3.env("writer").items():
        monkeypatch.setenv(k, v)
    options = {"endpoint_url": restartable_s3.endpoint}  # its own s3fs instance, not the session server's
    url = copy_set(local_set, restartable_s3.new_prefix(), dest_options=options).url
    ds = full(url, batch_size=100, prefetch=3, storage_options=options)
    waits = []
    lock = threading.Lock()

    def pause(seconds, stop):
        with lock:
            if not waits:
                restartable_s3.restart()
            waits.append(seconds)
        return False

    monkeypatch.setattr(prefetch, "_pause", pause)
    restartable_s3.kill()
    assert rows_of(ds) == reference(local_set)[0]
    assert waits and set(waits) == {prefetch.RETRY_DELAYS[0]}  # every read that failed succeeded on its retry


def test_permanent_errors_are_not_retried(s3_url, s3_server, monkeypatch):
    monkeypatch.setattr(prefetch, "_pause", lambda *a: pytest.fail("retried a permanent error"))
    ds = ActivationDataset(s3_url, batch_size=100)
    key = s3_url.removeprefix(f"s3://{s3_server.bucket}/") + "/" + ds.set.records[3].file
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key=key)
    with pytest.raises(ActcacheError, match=r"shard 3 of .* is missing \(shards/000003.safetensors\)"):
        list(ds)


def test_prefetch_keeps_depth_loads_in_flight_and_no_more():
    depth = 3
    barrier = threading.Barrier(depth, timeout=30)  # broken unless ``depth`` loads run at the same time
    started, finished = [], threading.Event()

    def load(i):
        started.append(i)
        if i < depth:
            barrier.wait()
        if i == depth:
            finished.set()
        return i

    it = prefetched(load, range(100), depth=depth)
    assert next(it) == 0  # items 0..2 were in flight together
    assert finished.wait(30)  # taking item 0 let item 3 start ...
    assert max(started) == depth  # ... and nothing beyond it
    it.close()
    assert not settled("actcache-prefetch")


def test_prefetch_and_background_errors_reach_the_consumer():
    def load(i):
        if i == 3:
            raise ValueError("shard 3 is bad")
        return i

    got = []
    with pytest.raises(ValueError, match="shard 3 is bad"):
        for x in prefetched(load, range(10), depth=2):
            got.append(x)
    assert got == [0, 1, 2]

    def items():
        yield from range(3)
        raise ValueError("batch 3 is bad")

    got = []
    with pytest.raises(ValueError, match="batch 3 is bad"):
        for x in background(items(), 2):
            got.append(x)
    assert got == [0, 1, 2]
