"""``actcache push SET REPO_ID``: a set on the Hugging Face Hub as a dataset repo; a rerun resumes.

The repo holds the set as a store holds it, under ``<set_id>/`` (shards, completion records, manifest), plus
a generated dataset card ``README.md`` at the root saying what the set is and how to load it: the set reads
back with ``actcache.open_set("hf://datasets/REPO_ID/<set_id>")`` (huggingface_hub's fsspec filesystem).

Uploads are commits of bounded size (``commit_bytes``, ``commit_files``) made with ``huggingface_hub``: shards
and their records first, the manifest and the card last, so a repo with a manifest holds the whole set. A
rerun lists the repo once and uploads only what is missing or different: shards are compared by sha256
with the hub's LFS object ids, small files by git blob id. The token is huggingface_hub's own (``HF_TOKEN``
or ``hf auth login``) and goes only to its endpoint (``HF_ENDPOINT``); actcache never reads, prints or stores it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from actcache.console import printable
from actcache.errors import ActcacheError, Failure, opt
from actcache.format import layout
from actcache.format.manifest import scrub, stored_bytes
from actcache.read.reader import ActivationSet, open_set
from actcache.storage import secrets
from actcache.storage.store import StoreRef

_OTHER_MANIFEST = re.compile(r"[0-9a-f]{24}/manifest\.json")


@dataclass(frozen=True)
class PushResult:
    url: str
    """``hf://datasets/REPO_ID/<set_id>``: where ``open_set`` reads it back."""
    uploaded: int
    skipped: int
    bytes_uploaded: int


@dataclass(frozen=True)
class _File:
    path: str
    """Path in the repo."""
    size: int
    read: Callable[[], bytes | str]
    """The bytes, or a local file's path (streamed by huggingface_hub)."""
    sha256: str | None = None
    """Known checksum (shards): compared with the hub's LFS oid without reading the file."""


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _hub_error(e: BaseException, repo_id: str, action: str) -> ActcacheError:
    """One line from a huggingface_hub failure: the status and what to do, never the server's text."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return ActcacheError(
            f"the hub rejected the token while {action} {repo_id} (HTTP 401); log in with "
            "`hf auth login` or set HF_TOKEN to a token with write access"
        )
    if status == 403:
        return ActcacheError(
            f"the hub refused {action} {repo_id} (HTTP 403): this token may not write there "
            "(a read-only token, or another user's namespace); use a write token or another REPO_ID"
        )
    if status == 404:
        return ActcacheError(f"the hub has no dataset repo {repo_id} or revision while {action} it (HTTP 404)")
    if status is not None:
        return Failure(
            f"the hub answered HTTP {status} while {action} {repo_id}; rerun the same push to "
            "resume (what was committed is kept)"
        )
    return Failure(
        f"cannot reach the hub while {action} {repo_id} ({type(e).__name__}); check HF_ENDPOINT "
        "and the network, then rerun the same push to resume"
    )


def _public(value: object) -> str:
    """A model or dataset name as the card may show it: a local path (a temporary folder, a home directory's cache)
    becomes "a local path" (a folder or a file), as it means nothing to a reader and says something about the machine
    it came from."""
    text = str(value)
    if text.startswith(("/", "./", "../", "~", "file:")) or "\\" in text or os.path.exists(text):
        return "a local path"
    return text


def _code(value: object) -> str:
    """``value`` as one Markdown code span: whatever a manifest holds (another pusher's, a forged one) shows as text,
    never as Markdown or HTML; a backtick inside gets a longer fence, control characters show as escapes."""
    text = printable(str(value))
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"{fence}{text}{fence}"


_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")


def _text(value: object) -> str:
    """A manifest's number (or whatever stands in its place) as plain Markdown text: a string is escaped."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (bool, int)) or value is None:
        return str(value)
    text = printable(str(value)).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_PUNCT.sub(r"\\\1", text)


def _section(m: dict, repo_id: str) -> list[str]:
    """The card's lines about one set (its manifest ``m``)."""
    model, tok = m.get("model") or {}, m.get("tokenization") or {}
    st = m.get("stats") if isinstance(m.get("stats"), dict) else None
    raw_sid = m.get("set_id")
    sid, url = _code(raw_sid), _code(f"hf://datasets/{repo_id}/{raw_sid}")
    rows = m.get("layout") == "rows"
    shape = (
        (
            "`activations` [n_rows, d] (globally shuffled), `tokens` [n_rows] int32 and `positions` [n_rows] "
            "int64 (the row's flat index in the source set)"
        )
        if rows
        else "`activations` [n_seq, context_size, d] and `tokens` [n_seq, context_size] int32"
    )
    dataset = m.get("dataset") or {}
    lines = [
        f"## {sid}: {_code(m.get('hook'))} of {_code(_public(model.get('name')))}",
        "",
        f"The hook {_code(m.get('hook'))} (layer {_text(m.get('layer'))}, d = {_text(m.get('d'))}) of "
        f"{_code(_public(model.get('name')))} ({_revision(model)}fingerprint "
        f"{_code(model.get('fingerprint'))}), {_text(m.get('n_tokens'))} tokens in {_text(m.get('n_shards'))} "
        f"shards, stored as {_code(m.get('dtype'))} (codec {_code(m.get('codec'))}). Read it as {url}.",
        "",
        f"- Dataset: {_code(_public(dataset.get('name', dataset.get('path'))))} "
        f"(fingerprint {_code(dataset.get('fingerprint'))}); "
        f"context size {_text(tok.get('context_size'))}, BOS prepended: {_text(tok.get('prepend_bos'))}, "
        f"separator id {_text(tok.get('separator_id'))}.",
        f"- Shards: plain safetensors files under {_code(f'{raw_sid}/shards/')} holding {shape}; "
        f"{_code(f'{raw_sid}/manifest.json')} records the full provenance and every shard's sha256.",
    ]
    if rows:
        lines.append(
            f"- Shuffled copy of set {_code(m['source']['set_id'])} with seed {_text(m.get('seed'))}; token ids "
            f"left out: {_text(m['excluded']['ids'] or 'none')}."
        )
    if st and st.get("n"):
        lines.append(
            f"- Normalisation: mean L2 norm {_text(st.get('mean_norm'))}, scale sqrt(d) / mean norm "
            f"{_text(st.get('scale'))}; per-dimension mean and variance in `manifest.json` (`stats`)."
        )
    return [*lines, ""]


def _revision(model: dict) -> str:
    """ "revision R, " for a hub model; nothing for a local one (its fingerprint pins it)."""
    rev = model.get("revision")
    return "" if rev is None else f"revision {_code(rev)}, "


def card(s: ActivationSet, repo_id: str, others: Sequence[dict] = ()) -> str:
    """The dataset card: every set in the repo (this one and the manifests ``others`` of those already there), what
    each is and how to load it (no timestamps: a rerun compares equal; no local paths)."""
    manifests = {m.get("set_id"): scrub(m) for m in others if isinstance(m, dict)}  # pushed by older versions too
    manifests[s.set_id] = s.manifest
    ordered = [manifests[k] for k in sorted(manifests, key=str)]
    url = f"hf://datasets/{repo_id}/{s.set_id}"
    hooks = sorted({str(m.get("hook")) for m in ordered})
    models = {
        (str((m.get("model") or {}).get("name")), str((m.get("model") or {}).get("fingerprint"))) for m in ordered
    }
    title = _code(hooks[0]) if len(hooks) == 1 else f"{len(hooks)} hooks"
    of = _code(_public(min(models)[0])) if len(models) == 1 else f"{len(models)} models"
    lines = [
        "---",
        "tags:",
        "- actcache",
        "- activations",
        "- interpretability",
        "viewer: false",
        "---",
        "",
        f"# {title} activations of {of}",
        "",
        f"{len(ordered)} actcache activation set{'s' if len(ordered) != 1 else ''}, each under its set id:",
        "",
    ]
    for m in ordered:
        lines += _section(m, repo_id)
    lines += [
        "## Loading",
        "",
        "Reading needs only actcache's base install (torch, safetensors, fsspec, huggingface_hub; no "
        "TransformerLens or Prefect), so it installs beside SAELens and other trainers: install actcache "
        f"{_version()} from its source (`pip install ./actcache`, or a wheel built by `pip wheel`); "
        "`actcache[extract]` adds what extraction needs.",
        "",
        "```python",
        "import actcache",
        "",
        f's = actcache.open_set("{url}")',
        "ds = actcache.ActivationDataset(",
        f'    "{url}", batch_size=4096, shuffle_buffer=1 << 20)',
        "for batch in ds:  # [4096, d] tensors",
        "    ...",
        "```",
        "",
        'Without actcache: `huggingface_hub.snapshot_download(repo_id="' + repo_id + '", repo_type="dataset")`, '
        "then `safetensors.torch.load_file` on each shard (listed in `manifest.json`).",
        "",
    ]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import version

    return version("actcache")


def _files(s: ActivationSet, repo_id: str, others: Sequence[dict] = ()) -> tuple[list[_File], list[_File]]:
    """(shards and records, then manifest and card) as they go to the repo; ``others``: the manifests of the other
    sets already in the repo, which the card describes too."""
    prefix = s.set_id
    local = s.store.local
    body: list[_File] = []
    for r in s.records:
        rel = f"{s.set_id}/{r.file}"
        read = (
            (lambda rel=rel, n=r.bytes: s.store.regular_path(rel, n))
            if local
            else (lambda rel=rel, n=r.bytes: s.store.read_bytes(rel, size=n))
        )
        body.append(_File(f"{prefix}/{r.file}", r.bytes, read, r.sha256))
        rec = s.store.read_bytes(f"{s.set_id}/{layout.record_file(r.index)}", limit=s.bounds.record_limit)
        body.append(_File(f"{prefix}/{layout.record_file(r.index)}", len(rec), lambda b=rec: b))  # type: ignore[misc]
    manifest = stored_bytes(s.store, s.set_id)  # as stored, but never a credential an old manifest holds
    text = card(s, repo_id, others).encode()
    last = [
        _File(f"{prefix}/{layout.MANIFEST}", len(manifest), lambda b=manifest: b),  # type: ignore[misc]
        _File("README.md", len(text), lambda b=text: b),  # type: ignore[misc]
    ]
    return body, last


def push_set(
    src: str | StoreRef,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_bytes: int = 1 << 30,
    commit_files: int = 200,
    on_commit: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> PushResult:
    """Upload the set at ``src`` (its URL, or its ``StoreRef`` where the store needs options or a credentials
    block) to the dataset repo ``repo_id`` (created if missing), at ``revision``. ``on_total(n)`` once the files
    to upload are known, ``on_commit(k)`` after each commit of ``k`` of them (progress)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    # Checked before anything is read or sent: a repo id or revision travels into the card, commits and errors.
    secrets.check_value(repo_id, "REPO_ID")
    secrets.check_value(revision, opt("revision"))
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ActcacheError(
            "REPO_ID is not a Hugging Face repo id: give namespace/name (letters, digits, '-', '_', '.'), "
            "e.g. user/gpt2-l6-resid"
        ) from None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # its every request would fail as "offline mode is enabled"
        raise ActcacheError(
            "HF_HUB_OFFLINE is set, so huggingface_hub sends no request and nothing can be pushed; "
            "unset it (or HF_HUB_OFFLINE=0) for the push"
        )
    s = open_set(src)
    api = HfApi()
    action = "creating"
    try:
        if not api.repo_exists(repo_id, repo_type="dataset"):
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision not in (None, "main"):
            action = "creating the branch of"
            api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
        action = "listing"
        remote: dict[str, Any] = {  # files only (they have a blob id), not folders
            f.path: f
            for f in api.list_repo_tree(repo_id, repo_type="dataset", revision=revision, recursive=True)
            if hasattr(f, "blob_id")
        }
        action = "reading the other manifests of"
        others = [
            json.loads(open(api.hf_hub_download(repo_id, p, repo_type="dataset", revision=revision), "rb").read())
            for p in sorted(remote)
            if _OTHER_MANIFEST.fullmatch(p) and not p.startswith(s.set_id)
        ]
        body, last = _files(s, repo_id, others)

        def present(f: _File) -> bool:
            have = remote.get(f.path)
            if have is None or have.size != f.size:
                return False
            if f.sha256 is not None:
                return have.lfs is not None and have.lfs.sha256 == f.sha256
            data = f.read()
            data = data if isinstance(data, bytes) else open(data, "rb").read()
            return have.blob_id == _git_blob_id(data) or (
                have.lfs is not None and have.lfs.sha256 == hashlib.sha256(data).hexdigest()
            )

        todo = [f for f in body if not present(f)]
        final = [f for f in last if not present(f)]
        uploaded = 0
        batches: list[list[_File]] = []
        for f in todo:
            if (
                not batches
                or len(batches[-1]) >= commit_files
                or sum(x.size for x in batches[-1]) + f.size > commit_bytes
            ):
                batches.append([])
            batches[-1].append(f)
        if final:
            batches.append(final)  # after every shard: a repo with this manifest holds the whole set
        if on_total:
            on_total(len(todo) + len(final))
        action = "uploading to"
        for i, batch in enumerate(batches):
            ops = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.read()) for f in batch]
            what = "manifest and card" if batch is final else f"{len(batch)} files"
            api.create_commit(
                repo_id,
                ops,
                repo_type="dataset",
                revision=revision,
                commit_message=f"actcache: {what} of set {s.set_id} ({i + 1}/{len(batches)})",
            )
            uploaded += sum(f.size for f in batch)
            if on_commit:
                on_commit(len(batch))
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id, action) from e
    except OSError as e:  # connection refused/reset (httpx errors are not OSErrors: see below)
        raise _hub_error(e, repo_id, action) from e
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2"):
            raise _hub_error(e, repo_id, action) from e
        raise
    n = len(body) + len(last)
    done = len(todo) + len(final)
    return PushResult(f"hf://datasets/{repo_id}/{s.set_id}", done, n - done, uploaded)
