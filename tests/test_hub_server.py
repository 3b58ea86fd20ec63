"""The fake hub (tests/hub_server.py) against the unmodified clients users run: huggingface_hub, transformers,
datasets and TransformerLens, reaching it only through HF_ENDPOINT."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def _parquet(rows: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": rows}), buf)
    return buf.getvalue()


def _jsonl(rows: list[str]) -> bytes:
    return "".join(json.dumps({"text": r}) + "\n" for r in rows).encode()


README_CONFIGS = b"""---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*.parquet
  - split: test
    path: main/test-*.parquet
- config_name: small
  data_files: small/*.parquet
---
# a tiny text set
"""


def test_without_the_hub_fixture_clients_stay_offline():
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(OfflineModeIsEnabled):
        HfApi().model_info("acme/anything")


# -- read API ----------------------------------------------------------------------------------------------
def test_model_info_refs_commits_and_tree_at_each_revision(hub, monkeypatch):
    from huggingface_hub import HfApi

    repo = hub.new_repo_id("tiny")
    first = hub.add_model(
        repo, {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": b"\0weights-1", "sub/notes.txt": b"v1"}
    )
    hub.tag(repo, "v1")
    second = hub.commit(repo, {"model.safetensors": b"\0weights-2"}, delete=["sub/notes.txt"])
    api = HfApi()

    assert api.model_info(repo).sha == second
    info = api.model_info(repo, revision=first, files_metadata=True)
    assert info.sha == first and info.config == {"model_type": "gpt2"}
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {"config.json", "model.safetensors", "sub/notes.txt"}
    assert siblings["model.safetensors"].lfs.size == len(b"\0weights-1") and siblings["config.json"].lfs is None
    assert api.model_info(repo, revision="v1").sha == first

    refs = api.list_repo_refs(repo)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", second)]
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", first)]
    assert [c.commit_id for c in api.list_repo_commits(repo)] == [second, first]
    assert sorted(api.list_repo_files(repo, revision="v1")) == ["config.json", "model.safetensors", "sub/notes.txt"]
    assert sorted(api.list_repo_files(repo)) == ["config.json", "model.safetensors"]
    hub.move_branch(repo, "main", first)
    assert api.model_info(repo).sha == first and "sub/notes.txt" in api.list_repo_files(repo)
    hub.move_branch(repo, "main", second)

    monkeypatch.setattr(hub, "page_size", 2)  # the client follows the Link header through 2 pages
    hub.clear_requests()
    tree = {f.path: f for f in api.list_repo_tree(repo, revision=first, recursive=True)}
    assert set(tree) == {"config.json", "model.safetensors", "sub", "sub/notes.txt"}
    assert len(hub.requests_matching(rf"/{repo}/tree/")) == 2
    expanded = {f.path: f for f in api.list_repo_tree(repo, recursive=True, expand=True)}
    assert expanded["config.json"].last_commit.oid == first and expanded["model.safetensors"].last_commit.oid == second
    infos = api.get_paths_info(repo, ["config.json", "sub", "missing.txt"], revision=first)
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "config.json"), ("RepoFolder", "sub")]
    assert api.file_exists(repo, "model.safetensors") and not api.file_exists(repo, "sub/notes.txt")


def test_dataset_info_reads_the_card(hub):
    from huggingface_hub import HfApi

    repo = hub.new_repo_id("texts")
    sha = hub.add_dataset(repo, {"README.md": README_CONFIGS, "main/train-0.parquet": _parquet(["a"])})
    info = HfApi().dataset_info(repo)
    assert info.sha == sha and info.card_data["configs"][1]["config_name"] == "small"
    assert HfApi().repo_info(repo, repo_type="dataset", revision=sha).sha == sha


def test_downloads_give_the_committed_bytes_and_a_cached_sha_asks_nothing(hub):
    from huggingface_hub import HfFileSystem, hf_hub_download, snapshot_download

    repo = hub.new_repo_id("files")
    weights = os.urandom(5000)
    files = {"config.json": b"{}", "model.safetensors": weights, "nested/dir/data.bin": os.urandom(300)}
    sha = hub.add_model(repo, files)

    assert Path(hf_hub_download(repo, "model.safetensors")).read_bytes() == weights
    snap = Path(snapshot_download(repo))
    assert snap.name == sha
    assert {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()} == files
    hub.clear_requests()
    assert Path(snapshot_download(repo, revision=sha)) == snap
    assert Path(hf_hub_download(repo, "config.json", revision=sha)).read_bytes() == b"{}"
    assert hub.requests_matching(repo) == []  # a commit sha never changes: everything came from the cache

    fs = HfFileSystem()
    assert fs.ls(f"{repo}/nested", detail=False) == [f"{repo}/nested/dir"]
    assert fs.glob(f"{repo}/**/*.bin") == [f"{repo}/nested/dir/data.bin"]
    hub.clear_requests()
    with fs.open(f"{repo}/model.safetensors", "rb", block_size=1000) as f:  # range requests
        f.seek(1200)
        assert f.read(100) == weights[1200:1300]
    assert {r.status for r in hub.requests_matching(rf"/{repo}/resolve/", "GET")} == {206}


def test_transformers_and_transformer_lens_load_a_hub_model_at_a_revision(hub, tiny_models):
    import torch
    from safetensors.torch import load_file, save
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    repo = hub.new_repo_id("tiny-gpt2")
    first = hub.add_model(repo, tiny_models["gpt2"])
    tensors = load_file(tiny_models["gpt2"] / "model.safetensors")
    changed = {k: v * 2 if k.endswith("wte.weight") else v for k, v in tensors.items()}
    hub.commit(repo, {"model.safetensors": save(changed, metadata={"format": "pt"})})

    assert AutoConfig.from_pretrained(repo, revision=first).n_layer == 3
    tok = AutoTokenizer.from_pretrained(repo, revision=first)
    assert tok("hello world")["input_ids"]
    old = AutoModelForCausalLM.from_pretrained(repo, revision=first)
    new = AutoModelForCausalLM.from_pretrained(repo)
    wte = next(v for k, v in tensors.items() if k.endswith("wte.weight"))
    assert torch.equal(old.transformer.wte.weight, wte) and torch.equal(new.transformer.wte.weight, wte * 2)

    hub.clear_requests()
    bridge = TransformerBridge.boot_transformers(repo, device="cpu", revision=first)
    assert "blocks.2.hook_resid_post" in bridge.hook_dict
    assert torch.equal(bridge.original_model.transformer.wte.weight, wte)
    assert hub.requests_matching(rf"^/api/models/{repo}")  # it asked the hub, not only the cache


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "downloaded"])
def test_load_dataset_configs_splits_and_a_moving_branch(hub, streaming):
    import datasets

    repo = hub.new_repo_id("texts")
    first = hub.add_dataset(
        repo,
        {
            "README.md": README_CONFIGS,
            "main/train-00000.parquet": _parquet(["a", "b"]),
            "main/test-00000.parquet": _parquet(["t"]),
            "small/part.parquet": _parquet(["s"]),
        },
    )

    def texts(*args, **kwargs):
        return [r["text"] for r in datasets.load_dataset(repo, *args, streaming=streaming, **kwargs)]

    assert texts("main", split="train") == ["a", "b"]
    assert texts("main", split="test") == ["t"]
    assert texts("small", split="train") == ["s"]
    hub.commit(repo, {"main/train-00000.parquet": _parquet(["c"])}, repo_type="dataset")  # main moves
    assert texts("main", split="train") == ["c"]
    assert texts("main", split="train", revision=first) == ["a", "b"]


def test_load_dataset_jsonl_by_folder_convention(hub):
    import datasets

    repo = hub.new_repo_id("plain")
    hub.add_dataset(repo, {"data/train.jsonl": _jsonl(["p1", "p2"]), "data/validation.jsonl": _jsonl(["v"])})
    assert [r["text"] for r in datasets.load_dataset(repo, split="train", streaming=True)] == ["p1", "p2"]
    assert [r["text"] for r in datasets.load_dataset(repo, split="validation")] == ["v"]


def test_errors_are_the_clients_usual_exceptions(hub):
    import datasets
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = hub.new_repo_id("errs")
    hub.add_model(repo, {"config.json": b"{}"})
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(hub.new_repo_id("missing"))
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "config.json", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.json")
    with pytest.raises(HfHubHTTPError) as e:
        api.model_info(repo, token="hf_not_a_valid_token")
    assert e.value.response.status_code == 401

    hub.set_repo(repo, private=True)
    assert api.model_info(repo).id == repo
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo, token=False)
    hub.set_repo(repo, private=False, gated=True)
    with pytest.raises(GatedRepoError) as e:
        hf_hub_download(repo, "config.json")
    assert e.value.response.status_code == 403
    with pytest.raises(GatedRepoError) as e:
        hf_hub_download(repo, "config.json", token=False)
    assert e.value.response.status_code == 401

    with pytest.raises(datasets.exceptions.DatasetNotFoundError):
        datasets.load_dataset(hub.new_repo_id("missing"), split="train")


# -- faults ---------------------------------------------------------------------------------------------------
def test_429_with_retry_after_and_5xx_are_retried_then_succeed(hub):
    from huggingface_hub import HfApi, hf_hub_download

    repo = hub.new_repo_id("busy")
    hub.add_model(repo, {"config.json": b'{"a": 1}'})
    hub.fail_next(rf"/{repo}/resolve/", status=429, times=2, retry_after=0, method="HEAD")
    assert Path(hf_hub_download(repo, "config.json")).read_bytes() == b'{"a": 1}'
    assert [r.status for r in hub.requests_matching(rf"/{repo}/resolve/", "HEAD")] == [429, 429, 200]

    hub.fail_next(rf"/{repo}/preupload/", status=503, times=1, method="POST")
    HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert [r.status for r in hub.requests_matching(rf"/{repo}/preupload/")] == [503, 200]
    assert hub.files(repo)["x.txt"] == b"x"


def test_stopped_hub_gives_connection_errors_and_restarted_serves_the_same(hub):
    import httpx2
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cached, uncached = hub.new_repo_id("cached"), hub.new_repo_id("uncached")
    sha = hub.add_model(cached, {"config.json": b"{}"})
    hub.add_model(uncached, {"config.json": b"[]"})
    snap = snapshot_download(cached)
    hub.stop()
    try:
        with pytest.raises(httpx2.ConnectError):
            HfApi().model_info(cached)
        assert snapshot_download(cached) == snap  # the clients' offline fallback: the cached snapshot
        with pytest.raises(LocalEntryNotFoundError):
            snapshot_download(uncached)
    finally:
        hub.restart()
    assert HfApi().model_info(cached).sha == sha
    assert Path(snapshot_download(uncached), "config.json").read_bytes() == b"[]"


# -- upload API -----------------------------------------------------------------------------------------------
def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_create_repo_and_upload_folder_then_list_and_download_the_same_bytes(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, hf_hub_download

    monkeypatch.setattr(hub, "lfs_chunk_size", 2048)  # files over 2 KiB take the multipart transfer
    files = {
        "README.md": b"# set\n",
        "manifest.json": b'{"n": 2}',
        "shards/0.safetensors": os.urandom(5000),
        "shards/1.safetensors": os.urandom(100),
    }
    api = HfApi()
    repo = api.create_repo(hub.new_repo_id("set"), repo_type="dataset").repo_id
    again = api.create_repo(repo, repo_type="dataset", exist_ok=True)  # the hub's 409 carries the repo's url
    assert again.repo_id == repo
    commit = api.upload_folder(folder_path=_folder(tmp_path / "set", files), repo_id=repo, repo_type="dataset")

    assert commit.oid == hub.sha(repo, repo_type="dataset")
    assert sorted(api.list_repo_files(repo, repo_type="dataset")) == sorted([".gitattributes", *files])
    for rel, data in files.items():
        assert Path(hf_hub_download(repo, rel, repo_type="dataset")).read_bytes() == data
    assert hub.requests_matching(r"^/_lfs/part/.*/3$", "PUT")  # 5000 bytes in 2048-byte parts
    assert hub.lfs_objects(repo, repo_type="dataset") == {
        hashlib.sha256(files[f"shards/{i}.safetensors"]).hexdigest() for i in (0, 1)
    }


def test_interrupted_upload_resumes_with_only_what_is_missing(hub, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(hub.new_repo_id("resume"), repo_type="dataset").repo_id
    files = {f"shards/{i}.safetensors": os.urandom(1000 + i) for i in range(4)}
    folder = _folder(tmp_path / "set", files)
    hub.fail_next(r"^/_lfs/put/", status=403, times=1, method="PUT")  # not retried by the client: the upload fails
    with pytest.raises(Exception, match="Error while uploading"):
        api.upload_folder(folder_path=folder, repo_id=repo, repo_type="dataset")
    assert sorted(hub.files(repo, repo_type="dataset")) == [".gitattributes"]  # nothing committed
    # The client uploads in parallel threads and stops at the failure: how many of the other three were stored by
    # then depends on the threads' timing (usually all three), never the failed one.
    stored = len(hub.lfs_objects(repo, repo_type="dataset"))
    assert stored <= 3

    hub.clear_requests()
    api.upload_folder(folder_path=folder, repo_id=repo, repo_type="dataset")
    assert len(hub.requests_matching(r"^/_lfs/put/", "PUT")) == 4 - stored
    assert {k: v for k, v in hub.files(repo, repo_type="dataset").items() if k != ".gitattributes"} == files


def test_uploads_refused_without_write_access(hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    repo = api.create_repo(hub.new_repo_id("locked")).repo_id

    def upload(**kwargs):
        with pytest.raises(HfHubHTTPError) as e:
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, **kwargs)
        return e.value.response.status_code

    assert upload(token=False) == 401
    assert upload(token=hub.read_token) == 403
    hub.set_repo(repo, read_only=True)
    assert upload() == 403
    assert sorted(hub.files(repo)) == [".gitattributes"]


def test_datasets_push_to_hub_round_trip(hub):
    import datasets

    repo = hub.new_repo_id("pushed")
    datasets.Dataset.from_dict({"text": ["q", "r"]}).push_to_hub(repo)
    assert "data/train-00000-of-00001.parquet" in hub.files(repo, repo_type="dataset")
    assert [r["text"] for r in datasets.load_dataset(repo, split="train")] == ["q", "r"]


# -- the user's way: a fresh process configured only by its environment ------------------------------------------
@pytest.mark.subprocess
def test_a_subprocess_reaches_the_hub_through_its_environment(hub):
    model, data = hub.new_repo_id("m"), hub.new_repo_id("d")
    sha = hub.add_model(model, {"config.json": b"{}"})
    hub.add_dataset(data, {"data/train.jsonl": _jsonl(["x", "y"])})
    code = textwrap.dedent(f"""
        import datasets, huggingface_hub
        print(huggingface_hub.HfApi().model_info({model!r}).sha)
        print([r["text"] for r in datasets.load_dataset({data!r}, split="train", streaming=True)])
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **hub.env()}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == [sha, "['x', 'y']"]


def test_repos_named_like_api_words_route_to_themselves(hub):
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    for name in ("tree", "resolve", "commit", "refs"):
        repo = hub.new_repo_id(name)
        sha = hub.add_model(repo, {"config.json": name.encode()})
        assert api.model_info(repo).sha == sha
        assert api.list_repo_files(repo) == ["config.json"]
        assert [b.name for b in api.list_repo_refs(repo).branches] == ["main"]
        assert Path(hf_hub_download(repo, "config.json")).read_bytes() == name.encode()
