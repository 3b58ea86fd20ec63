"""Progress: the artifact reaches 100% in the UI, and a slow API never holds up the thread that advances it."""

from __future__ import annotations

import io
import sys
import threading
import time

from actcache import progress
from actcache.progress import Progress, Window


def _artifact_progress(artifact_id) -> float:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))
    return float(art.data)


def test_artifact_ends_at_100_without_blocking_advance(prefect_harness, monkeypatch):
    """The first update is held (a busy server) until every advance() has returned: advancing never waits on
    the API, and only the newest value is sent once the server answers. Events, not timings."""
    from prefect import flow
    from prefect.artifacts import update_progress_artifact

    calls = []
    entered, release = threading.Event(), threading.Event()

    def busy_update(artifact_id, progress):
        entered.set()
        assert release.wait(60), "the test never released the update"
        calls.append(progress)
        return update_progress_artifact(artifact_id, progress=progress)

    monkeypatch.setattr(progress, "ARTIFACT_EVERY_S", 0.0)
    monkeypatch.setattr("prefect.artifacts.update_progress_artifact", busy_update)

    @flow
    def advance_five():
        with Progress(5, key="test-progress") as p:
            p.advance()
            assert entered.wait(60), "the first update never started"
            for _ in range(4):
                p.advance()  # would deadlock until the 60 s guard if it waited for the held update
            advanced_while_held = not release.is_set()
            release.set()
        return p.publisher.artifact_id, advanced_while_held

    artifact_id, advanced_while_held = advance_five()
    assert advanced_while_held
    assert calls == [20.0, 100.0]  # the held 20%, then only the newest value: 40/60/80 were never sent
    assert _artifact_progress(artifact_id) == 100.0


def test_progress_outside_a_flow_just_counts():
    with Progress(3) as p:
        for _ in range(3):
            p.advance()
    assert p.done == 3 and p.publisher is None


def test_window_keeps_order_and_bounds_in_flight():
    class Done:
        def __init__(self, v):
            self.v = v

        def result(self):
            return self.v

    seen = []
    w = Window(2, on_result=seen.append)
    for i in range(5):
        w.add(Done(i))
        assert len(w.pending) <= 2
    assert w.drain() == [0, 1, 2, 3, 4] and seen == [0, 1, 2, 3, 4]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_only_on_a_terminal_and_a_line_per_named_step(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # the suite disables tqdm; this test is about when it draws
    lines = []
    log_file = io.StringIO()  # a pipe or log file: no isatty
    monkeypatch.setattr(sys, "stderr", log_file)
    with Progress(4, log=lines.append) as p:
        for i in range(4):
            p.advance(tokens=1000, item=f"shard {i}")
    assert log_file.getvalue() == ""  # no bar, no carriage returns
    assert len(lines) == 4 and lines[0].startswith("shard 0: 1/4 shards, ") and "tokens/s, ETA " in lines[0]
    assert lines[-1].startswith("shard 3: 4/4 shards, ") and lines[-1].endswith("ETA 0:00:00")

    terminal = _Terminal()  # control: the same on a terminal draws a bar
    monkeypatch.setattr(sys, "stderr", terminal)
    with Progress(4) as p:
        p.advance(4)
    assert "\r" in terminal.getvalue() and "4/4" in terminal.getvalue()


def test_artifact_value_never_exceeds_100(monkeypatch):
    monkeypatch.setattr(progress, "ARTIFACT_EVERY_S", 0.0)

    class Recorder:
        def __init__(self):
            self.values: list[float] = []

        def publish(self, value: float) -> None:
            self.values.append(value)

        def close(self, wait_s: float) -> None:
            pass

    with Progress(2) as p:
        p.publisher = Recorder()
        p.advance()
        p.advance(2)  # one step too many
    assert p.publisher.values == [50.0, 100.0] and p.done == 3


def test_off_a_terminal_a_long_step_still_gets_its_periodic_line(monkeypatch):
    """A step that takes longer than LINE_EVERY_S (one big shard, one commit of a push) still prints the count in
    a log every LINE_EVERY_S, not only when it ends; the last line comes once, with the total."""
    import time

    from actcache import console, progress

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.3)
    log_file = io.StringIO()  # a pipe or log file: no isatty
    monkeypatch.setattr(sys, "stderr", log_file)
    with console.quieted(True), progress.Steps("cp", "shard") as steps:
        steps.total(2)
        deadline = time.monotonic() + 30
        while "cp: 0/2 shards" not in log_file.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)  # the first step is still running
        steps.advance()
        steps.advance()
    lines = log_file.getvalue().splitlines()
    assert "cp: 0/2 shards" in lines and lines[-1] == "cp: 2/2 shards" and lines.count("cp: 2/2 shards") == 1, lines


def test_a_stopped_window_waits_for_every_write_in_flight_and_reads_no_result():
    ended = []

    class Writing:
        def __init__(self, i):
            self.i = i

        def wait(self):
            time.sleep(0.05)
            ended.append(self.i)

        def result(self):
            raise RuntimeError("a run being stopped reads no result")

    seen = []
    w = Window(3, on_result=seen.append)
    for i in range(3):
        w.add(Writing(i))
    w.settle()
    assert ended == [0, 1, 2] and not w.pending and seen == []
