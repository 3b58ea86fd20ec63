"""S3 faults (issue 6, faults 2 and 3) on a real moto_server over HTTP, checked against a run on local disk.

2. The endpoint is SIGKILLed right after the set's first shard PUT and restarted on the same port: the
   flow's retries (or the next rerun) finish the set, and no object is ever partial.
3. Two processes extract the same set into the same prefix at once: the set equals a single run's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cliargs import config_argv
from setfiles import local_tree, normalized

from actcache.config import ExtractConfig
from actcache.format import layout
from actcache.read.reader import open_set

pytestmark = pytest.mark.usefixtures("prefect_harness")

N_SHARDS = 16  # enough shards that the run is still uploading when the endpoint dies
SHARD_PUT = re.compile(r'"PUT /[^ ]*/([0-9a-f]{24})/(shards/[0-9]{6}\.safetensors)')
UPLOADED = re.compile(r"Task run 'upload-[^']*' - Finished in state Completed")
RETRYING = re.compile(r"Task run 'upload-[^']*' - Task run failed with exception: StoreUnavailable.* - Retry 1/")
CLI = str(Path(sys.executable).with_name("actcache"))


@pytest.fixture(scope="module")
def config(make_config) -> ExtractConfig:
    return make_config(max_tokens=128 * N_SHARDS)


def cli_args(cfg: ExtractConfig) -> list[str]:
    # --verbose: the tests watch Prefect's task-run lines
    return [
        "--verbose",
        *config_argv(cfg, max_tokens=cfg.max_tokens, batch_size=4, storage_options=cfg.storage_options),
    ]


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> dict[str, bytes]:
    """The same set written to local disk by one uninterrupted run."""
    from actcache.flows.extract import extract_activations

    root = tmp_path_factory.mktemp("reference")
    extract_activations(config.replace(store=str(root)), return_state=True).result()
    return local_tree(root)


def set_id_of(files: dict[str, bytes]) -> str:
    return next(rel.split("/")[0] for rel in files if layout.SET_ID_RE.match(rel.split("/")[0]))


def cli_env(server, user: str = "writer") -> dict[str, str]:
    """A subprocess's environment: this server's keys, and this session's Prefect server (no cold start)."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        server.env(user),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        PREFECT_API_URL=PREFECT_API_URL.value(),
        TQDM_DISABLE="1",
    )
    return env


def shard_puts(log: Path, start: int = 0) -> list[tuple[str, str]]:
    """(set id, shard file) of every shard PUT moto logged from byte ``start`` on (logged once answered)."""
    return SHARD_PUT.findall(log.read_text(errors="replace")[start:]) if log.exists() else []


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def assert_nothing_partial(server, url: str, reference: dict[str, bytes]) -> None:
    """Every shard object is complete (the reference's bytes) and every record has its complete shard."""
    objects = server.keys_under(url)
    for rel, data in objects.items():
        if "/shards/" in rel:
            assert data == reference[rel], f"{rel} is partial or wrong ({len(data)} bytes)"
        index = layout.parse_record_file(rel.split("/", 1)[1])
        if index is not None:
            shard = f"{rel.split('/', 1)[0]}/{json.loads(data)['file']}"
            assert objects.get(shard) == reference[shard], f"{rel} is recorded but its shard is not complete"


def upload_runs(flow_run_id, expected: int, timeout: float = 30.0) -> list:
    """The flow run's final upload task runs, once the server has recorded ``expected`` of them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + timeout
        while True:  # task runs reach the server as events, a moment after the flow returns
            runs = [
                r
                for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
                if r.name.startswith("upload") and r.state and r.state.is_final()
            ]
            if len(runs) >= expected or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)


def test_endpoint_killed_mid_upload_comes_back(config, reference, restartable_s3, monkeypatch):
    """The endpoint dies (SIGKILL) right after the set's first shard PUT, stays down 3 s, restarts on the same
    port with its objects. moto keeps state in memory only: the restarted server replays moto's request
    recording before its port opens, so what the proof rests on is the client side: uploads that hit the dead
    endpoint are retried (or, if the outage hit a stage without retries, the rerun finishes), and no object is
    ever partial."""
    from actcache.flows.extract import extract_activations

    server = restartable_s3
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    url = server.new_prefix()
    cfg = config.replace(store=url, storage_options={"endpoint_url": server.endpoint})
    seen: dict[str, object] = {}

    def outage() -> None:
        try:
            wait_for(lambda: shard_puts(server.log_path), 120, "the first shard upload")
            server.kill()
            seen["puts_before_kill"] = len(shard_puts(server.log_path))
            time.sleep(3.0)
            server.restart()
            seen["restarted"] = True
        except BaseException as e:  # raised in the test thread below
            seen["error"] = e

    killer = threading.Thread(target=outage, name="s3-outage")
    killer.start()
    try:
        state = extract_activations(cfg, return_state=True)
    finally:
        killer.join(timeout=150)
    assert "error" not in seen and seen.get("restarted"), seen
    assert seen["puts_before_kill"] < N_SHARDS, "the run had finished uploading before the endpoint died"
    assert_nothing_partial(server, url, reference)

    if state.is_completed():
        retried = [r for r in upload_runs(state.state_details.flow_run_id, N_SHARDS) if r.run_count > 1]
        assert retried, "the run completed, yet no upload met the dead endpoint"
    else:  # the outage hit a stage that is not retried (e.g. reading token shards): one line, then a rerun
        with pytest.raises(Exception, match=r"cannot reach http://127\.0\.0\.1:\d+ while \w+ s3://"):
            state.result()
        recorded = {rel for rel in server.keys_under(url) if re.fullmatch(r"[0-9a-f]{24}/done/[0-9]{6}\.json", rel)}
        start = server.log_path.stat().st_size
        extract_activations(cfg, return_state=True).result()
        # Exactly the shards without a completion record are uploaded again (how many had one depends on
        # when the outage hit: possibly none).
        assert len(shard_puts(server.log_path, start)) == N_SHARDS - len(recorded), "done shards were redone"

    assert normalized(server.keys_under(url)) == reference
    assert open_set(f"{url}/{set_id_of(reference)}", {"endpoint_url": server.endpoint}).verify() == []


def test_client_killed_while_endpoint_down_then_rerun(config, reference, restartable_s3, monkeypatch, tmp_path):
    """The endpoint dies mid-upload and the client is SIGKILLed while it waits to retry; the endpoint comes
    back (recording replayed) and a rerun uploads exactly the shards that have no completion record."""
    from actcache.flows.extract import extract_activations

    server = restartable_s3
    url = server.new_prefix()
    cfg = config.replace(store=url, storage_options={"endpoint_url": server.endpoint})
    out = tmp_path / "client.log"
    proc = subprocess.Popen(
        [CLI, *cli_args(cfg)],
        env=cli_env(server),
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=tmp_path,
    )
    try:
        wait_for(lambda: shard_puts(server.log_path) or proc.poll() is not None, 180, "the first shard upload")
        server.kill()
        # An event, not a delay: the client has met the dead endpoint once an upload is waiting to be retried.
        wait_for(
            lambda: RETRYING.search(out.read_text(errors="replace")) or proc.poll() is not None,
            180,
            "an upload retry after the endpoint died",
        )
        assert proc.poll() is None, "the client finished before the endpoint died"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    server.restart()
    assert_nothing_partial(server, url, reference)

    before = server.keys_under(url)
    set_id = set_id_of(reference)
    done = {layout.parse_record_file(k.split("/", 1)[1]) for k in before if k.startswith(set_id + "/")} - {None}
    assert len(done) < N_SHARDS and f"{set_id}/{layout.MANIFEST}" not in before

    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    start = server.log_path.stat().st_size
    extract_activations(cfg, return_state=True).result()
    rerun = [f for s, f in shard_puts(server.log_path, start) if s == set_id]
    assert sorted(rerun) == sorted(layout.shard_file(i, "none") for i in range(N_SHARDS) if i not in done)
    assert normalized(server.keys_under(url)) == reference
    assert open_set(f"{url}/{set_id}", {"endpoint_url": server.endpoint}).verify() == []


@pytest.mark.subprocess
def test_two_processes_extract_the_same_set_at_once(config, reference, s3_server, s3_env, tmp_path):
    """Two CLI processes extract one set into one prefix at once. Left to the scheduler, one often finishes
    before the other has planned; so the first to store a shard is paused (SIGSTOP) until the other has stored
    one too: then both upload the remaining shards concurrently. Whole-object PUTs of identical bytes, each
    record after its shard: the set equals a single run's."""
    url = s3_server.new_prefix()
    cfg = config.replace(store=url, storage_options={"endpoint_url": s3_server.endpoint})
    start = s3_server.log_path.stat().st_size
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen(
            [CLI, *cli_args(cfg)],
            env=cli_env(s3_server),
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            cwd=tmp_path,
        )
        for log in logs
    ]

    def stored(i: int) -> bool:
        return bool(UPLOADED.search(logs[i].read_text(errors="replace")))

    try:
        wait_for(lambda: stored(0) or stored(1) or any(p.poll() is not None for p in procs), 240, "a stored shard")
        first = 0 if stored(0) else 1
        procs[first].send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: stored(1 - first) or procs[1 - first].poll() is not None, 240, "the other's shard")
        finally:
            procs[first].send_signal(signal.SIGCONT)
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    for p, out, log in zip(procs, outs, logs, strict=True):
        assert p.returncode == 0, log.read_text()[-3000:]
        assert out.strip().splitlines()[-1] == f"{url}/{set_id_of(reference)}"

    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    mine = "\n".join(line for line in s3_server.log_path.read_text()[start:].splitlines() if f"/{prefix}/" in line)
    puts = [f for _, f in SHARD_PUT.findall(mine)]
    assert set(puts) == {layout.shard_file(i, "none") for i in range(N_SHARDS)}
    assert any(puts.count(f) >= 2 for f in puts), "the two runs did not overlap: one skipped the other's set"
    assert normalized(s3_server.keys_under(url)) == reference
    s = open_set(f"{url}/{set_id_of(reference)}", {"endpoint_url": s3_server.endpoint})
    assert s.verify() == []
    assert sum(len(s.read(r, verify=True).tokens) for r in s.records) == N_SHARDS * 4
