"""The flow end to end on a real S3 endpoint (moto_server over HTTP), compared with the same set on disk."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from actcache.extraction.plan import make_plan
from actcache.format import layout

pytestmark = pytest.mark.usefixtures("prefect_harness")

# The seal (json_sha256) covers the timestamps too: it differs whenever they do.
TIMESTAMPS = ("created_at", "updated_at", "json_sha256")


def run(cfg, *, fail_ok: bool = False, last: str | None = None):
    """Run the flow; return (state, {task name: [final task runs]}) once the server has recorded a final run of
    ``last`` (default: summarize, the flow's last task; a failed flow names the task that failed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from actcache.flows.extract import extract_activations

    state = extract_activations(cfg, return_state=True)
    if not fail_ok:
        state.result()
    flow_run_id = state.state_details.flow_run_id
    last = last or "summarize"
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 60
        while True:  # task runs reach the server as events: wait until the awaited one is recorded
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            by_name: dict[str, list] = {}
            for r in runs:
                if r.state and r.state.is_final():
                    by_name.setdefault(r.name.rsplit("-", 1)[0], []).append(r)
            if last in by_name or time.monotonic() > deadline:
                return state, by_name
            time.sleep(0.2)


def counts(by_name) -> Counter:
    return Counter({k: len(v) for k, v in by_name.items()})


def local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def without_timestamps(manifest_bytes: bytes) -> dict:
    m = json.loads(manifest_bytes)
    for k in TIMESTAMPS:
        m.pop(k)
    return m


def test_extract_to_s3_rerun_listing_and_local_equality(base_config, s3_server, s3_env, tmp_path):
    url = s3_server.new_prefix()
    cfg = base_config.replace(store=url)
    state, by_name = run(cfg)
    [set_url] = state.result()
    assert set_url.startswith(url + "/")
    assert counts(by_name)["extract"] == 4 and counts(by_name)["upload"] == 4

    # An independent listing (boto3, not s3fs) shows exactly the set, its token cache and its content entries.
    plan = make_plan(cfg)
    set_id, tokens = plan.sets[0].set_id, layout.tokens_dir(plan.tokens_key.id)
    objects = s3_server.keys_under(url)
    m = json.loads(objects[f"{set_id}/{layout.MANIFEST}"])
    expected = {f"{set_id}/{layout.MANIFEST}", f"{tokens}/index.json"}
    expected |= {layout.content_entry(m["content_id"]), layout.content_entry(m["content_family"])}
    for i in range(4):
        expected |= {
            f"{set_id}/{layout.shard_file(i, 'none')}",
            f"{set_id}/{layout.record_file(i)}",
            f"{tokens}/{layout.shard_file(i, 'none')}",
            f"{tokens}/{layout.record_file(i)}",
        }
    assert set(objects) == expected
    assert not plan.missing  # the plan, read back from S3, finds every shard done

    # The rerun computes nothing and leaves every object as it was.
    _, by_name2 = run(cfg)
    c2 = counts(by_name2)
    assert c2["extract"] == 0 and c2["compress"] == 0 and c2["upload"] == 0 and c2["skip-cached"] == 1
    after = s3_server.keys_under(url)
    assert {k: v for k, v in after.items() if not k.endswith(layout.MANIFEST)} == {
        k: v for k, v in objects.items() if not k.endswith(layout.MANIFEST)
    }

    # The same set on local disk: same files, same bytes; manifests equal but for their timestamps.
    local = tmp_path / "local-store"
    run(base_config.replace(store=str(local)))
    on_disk = local_files(local)
    assert set(on_disk) == set(after)
    for rel, data in on_disk.items():
        if rel.endswith(layout.MANIFEST):
            assert without_timestamps(data) == without_timestamps(after[rel])
        else:
            assert data == after[rel], rel


def test_half_written_shard_is_never_counted_done(base_config, s3_server, s3_env):
    """A shard object without its record (upload interrupted before the record) is recomputed, and so is a
    shard whose object was replaced by a shorter one."""
    url = s3_server.new_prefix()
    cfg = base_config.replace(store=url)
    [set_url] = run(cfg)[0].result()
    set_id = set_url.rsplit("/", 1)[1]
    good = s3_server.keys_under(url)
    c = s3_server.client()
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    shard1, shard2 = (f"{set_id}/{layout.shard_file(i, 'none')}" for i in (1, 2))
    c.delete_object(Bucket=s3_server.bucket, Key=f"{prefix}/{set_id}/{layout.record_file(1)}")
    c.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{shard2}", Body=good[shard2][: len(good[shard2]) // 2])

    _, by_name = run(cfg)
    assert counts(by_name)["extract"] == 2 and counts(by_name)["upload"] == 2
    repaired = s3_server.keys_under(url)
    assert repaired[shard1] == good[shard1] and repaired[shard2] == good[shard2]


def test_credentials_block_and_nothing_leaks(base_config, s3_server, s3_env, monkeypatch):
    """Credentials come from a Prefect AwsCredentials block named in the config; the secret appears in no
    object, flow parameter, log line or artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect_aws import AwsCredentials

    key, secret = s3_server.keys["writer"]
    AwsCredentials(aws_access_key_id=key, aws_secret_access_key=secret).save("actcache-s3-test", overwrite=True)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")  # the chain would fail: the block must win
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    url = s3_server.new_prefix()
    cfg = base_config.replace(store=url, aws_credentials_block="actcache-s3-test")
    state, by_name = run(cfg)
    assert counts(by_name)["upload"] == 4

    for rel, data in s3_server.keys_under(url).items():
        assert secret.encode() not in data and key.encode() not in data, rel
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        params = json.dumps(client.read_flow_run(flow_run_id).parameters, default=str)
        assert "actcache-s3-test" in params and secret not in params and key not in params
        deadline = time.monotonic() + 60
        while True:  # logs are shipped in batches: wait for the flow's last line rather than a fixed time
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if (
                any("Finished in state Completed" in log.message for log in logs if log.task_run_id is None)
                or time.monotonic() > deadline
            ):
                break
            time.sleep(0.2)
        assert len(logs) > 4 and not any(secret in log.message or key in log.message for log in logs)
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        assert arts and not any(secret in json.dumps(a.data, default=str) for a in arts)


def test_secrets_in_storage_options_are_refused(base_config):
    with pytest.raises(Exception, match=r"must not hold credentials \(secret\).*aws_credentials_block"):
        base_config.replace(storage_options={"endpoint_url": "http://x", "secret": "s"})
    with pytest.raises(Exception, match=r"must not hold credentials \(client_kwargs\.aws_secret_access_key\)"):
        base_config.replace(storage_options={"client_kwargs": {"aws_secret_access_key": "s"}})


def test_access_denied_upload_fails_once_without_retries(base_config, s3_server, s3_env, monkeypatch):
    """The reader may list and read but not write: its run fails on the first upload, which is not retried."""
    url = s3_server.new_prefix()
    run(base_config.replace(store=url, hook="blocks.0.hook_resid_post"))  # the writer makes the token cache
    for k, v in s3_server.env("reader").items():
        monkeypatch.setenv(k, v)
    cfg = base_config.replace(store=url, storage_options={"skip_instance_cache": True})
    state, by_name = run(cfg, fail_ok=True, last="upload")
    assert state.is_failed()
    uploads = by_name["upload"]
    assert uploads and all(r.run_count == 1 and r.state.is_failed() for r in uploads)
    with pytest.raises(Exception, match=r"access denied while writing s3://.*\(AccessDenied\)"):
        state.result()
