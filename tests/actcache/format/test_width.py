"""The width a set's key vouches for: a model config checked against the key's fingerprint, and the hook rule."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from actcache.format import width
from actcache.format.key import SetKey, TokensKey
from actcache.inputs.model import ModelSpec, hook_catalog, resolve_model


def _key(model: str, hook: str = "blocks.1.hook_resid_post", **fields: str) -> SetKey:
    tokens = TokensKey(
        dataset="files:aa",
        tokenizer="tt",
        text_column="text",
        context_size=16,
        prepend_bos=True,
        separator=None,
        seqs_per_shard=4,
    )
    return SetKey(tokens, model, "float32", hook, "float16", "zstd", 3, **fields)


def test_the_hook_rule_derives_every_per_token_hook_of_the_test_models_and_never_understates_one(tiny_models):
    """For every hook the bridges of GPT-2, Llama (grouped-query attention) and GPT-NeoX give one vector per token
    (TransformerLens names and the bridge's aliases alike): the table of hook families derives a shape from the
    config, at least the hook's on every axis (so no true set is refused), and exactly it but for the MLP's input
    side (bounded at twice its width, for architectures that fuse gate and up)."""
    for arch, path in tiny_models.items():
        config = json.loads((path / "config.json").read_text())
        catalog = hook_catalog(resolve_model(ModelSpec(str(path))))
        for hook, shape in catalog.per_token.items():
            rule = width.hook_shape(config, hook)
            assert rule is not None, (arch, hook, shape)
            assert len(rule) == len(shape) and all(a <= b for a, b in zip(shape, rule, strict=True)), (arch, hook, rule)
            if hook.endswith(("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.in.hook_out", "mlp.gate.hook_out")):
                assert math.prod(rule) == 2 * math.prod(shape), (arch, hook, shape, rule)
            else:
                assert shape == rule, (arch, hook, shape, rule)
        # hooks that give no vector per token (the plan refuses them) are bounded too: a forged key may name them
        assert width.hook_shape(config, "blocks.0.attn.hook_pattern", 128) == (config.get("n_head") or 4, 128)
        assert width.hook_shape(config, "blocks.0.attn.hook_pattern") is None  # per key position: needs a context
    assert width.hook_shape({"n_embd": 768, "n_head": 12, "n_inner": None}, "blocks.3.mlp.hook_post") == (3072,)
    assert width.hook_shape({"hidden_size": 64}, "blocks.0.attn.hook_z") is None  # no head count: no rule
    assert width.hook_shape({"hidden_size": 64}, "blocks.0.hook_something_new") is None
    gqa = {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 100}
    assert width.hook_shape(gqa, "blocks.1.attn.hook_v") == (2, 8)
    assert width.hook_shape(gqa, "blocks.1.attn.qkv.hook_out") == ((8 + 2 * 2) * 8,)
    assert width.hook_shape(gqa, "hook_unembed") == (100,)


def test_the_plan_refuses_a_hook_the_rule_would_understate_and_says_when_it_derives_none(tiny_models, monkeypatch):
    """One source of truth: the plan checks the bridge's shape of each hook it extracts against the table readers
    bound sets by. A hook the table understates would make every reader refuse a true set: the plan refuses it."""
    from actcache.errors import ActcacheError
    from actcache.extraction.plan import check_width_rule

    model = resolve_model(ModelSpec(str(tiny_models["gpt2"])))
    check_width_rule({"blocks.0.hook_resid_post": (32,), "blocks.0.attn.hook_z": (4, 8)}, model)
    with pytest.raises(ActcacheError, match=r"hook 'blocks.0.attn.hook_z' .* gives \[4, 9\].*\(\[4, 8\]\)"):
        check_width_rule({"blocks.0.attn.hook_z": (4, 9)}, model)
    import logging

    from actcache.orchestration import logs

    seen: list[str] = []
    logger = logging.getLogger("actcache.test_width")
    logger.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: seen.append(r.getMessage())})())
    monkeypatch.setattr(logs, "run_logger", lambda: logger)  # the handlers another test left on "actcache" vary
    check_width_rule({"blocks.0.attn.hook_new": (7,)}, model)
    assert any("derives no width for hook 'blocks.0.attn.hook_new'" in line for line in seen), seen


def test_a_local_models_config_counts_only_when_it_gives_the_keys_fingerprint(tiny_models, tmp_path):
    """The manifest carries config.json and the hashes the fingerprint combines; a reader recomputes the
    fingerprint. An edited config, an edited hash, or another model's config is not the key's: no width then."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["gpt2"], folder)
    model = resolve_model(ModelSpec(str(folder)))
    m = {"model_config": model.config_witness()}
    key = _key(model.fingerprint)
    assert width.model_config(key, m) == json.loads((folder / "config.json").read_text())
    assert width.key_width(key, m) == 32
    assert width.key_width(key, {}) is None  # a set written before manifests carried it
    assert width.key_width(_key("local:" + "0" * 40), m) is None  # another model's config
    wide = m["model_config"]["config"].replace('"n_embd": 32', '"n_embd": 4194304')
    assert wide != m["model_config"]["config"]
    assert width.key_width(key, {"model_config": {**m["model_config"], "config": wide}}) is None
    files = {**m["model_config"]["files"], "config.json": hashlib.sha256(wide.encode()).hexdigest()}
    assert width.key_width(key, {"model_config": {"files": files, "config": wide}}) is None
    crlf = folder / "config.json"  # its bytes as hashed, whatever its line ends
    crlf.write_bytes(crlf.read_bytes().replace(b"\n", b"\r\n"))
    model = resolve_model(ModelSpec(str(folder)))
    assert width.key_width(_key(model.fingerprint), {"model_config": model.config_witness()}) == 32


def test_a_hub_models_config_comes_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """``hf:<sha>``: the commit's config.json in the local cache (whatever the repository's name), else nothing."""
    sha = "ab" * 20
    snap = tmp_path / "hub" / "models--org--m" / "snapshots" / sha
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"hidden_size": 48, "num_attention_heads": 4}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert width.key_width(_key("hf:" + sha), {}) == 48
    assert width.key_width(_key("hf:" + sha, "blocks.0.attn.hook_z", heads="0,3"), {}) == 2 * 12
    many = ",".join(map(str, range(9)))  # no true key selects more heads or dims than the axis has: bounded by it
    assert width.key_width(_key("hf:" + sha, "blocks.0.attn.hook_z", heads=many, dims=many), {}) == 4 * 9
    assert width.key_width(_key("hf:" + sha, "blocks.0.attn.hook_z", heads="0", dims=many * 2), {}) == 1 * 12
    assert width.key_width(_key("hf:" + "cd" * 20), {}) is None
    assert width.key_width(_key("hf:../../" + sha[8:]), {}) is None  # not a sha: never a path


@pytest.mark.parametrize(
    ("hook", "fields", "expected"),
    [
        ("blocks.0.attn.hook_z", {"heads": "0,1", "dims": "0,2,5"}, 2 * 3),
        ("blocks.0.hook_resid_post", {"dims": "1,5,7"}, 3),
        ("blocks.0.attn.hook_z", {"dims": "0,1"}, None),  # how many heads: only the config says
        ("blocks.0.hook_resid_post", {}, None),
    ],
)
def test_a_selection_in_the_key_gives_a_width_without_the_config(hook, fields, expected):
    """The key holds the kept indices: a selection of both axes (or of a vector's one) is a width by itself."""
    assert width.key_width(_key("hf:" + "ef" * 20, hook, **fields), {}) == expected


# -- forged sets: what today's bound lets through, and what the key's width refuses ---------------------------------
FORGED_MB = 48
"""A forged shard's activations: under the stored-size bound's 64 MiB that holds where the key vouches for no width
(so a reader without the key's width allocates them), thousands of times a true shard of these sets (8.7 KB)."""

_READERS = """
import json, sys, tempfile
from actcache.errors import ActcacheError

def status(field):  # kB, from /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

url, ops = sys.argv[1], sys.argv[2].split(",")
import torch, zstandard, actcache.sets.export, actcache.sets.shuffle, actcache.sets.copy, actcache.read.dataset  # noqa
from actcache.read.dataset import ActivationDataset
from actcache.read.reader import open_set
from actcache.sets import copy, export, shuffle, stats

run = {
    "read": lambda: open_set(url).read(open_set(url).records[0]),
    "dataset": lambda: list(ActivationDataset(url, batch_size=16, shuffle_buffer=64)),
    "export": lambda: export.export_set(url, tempfile.mkdtemp() + "/out", format="hf"),
    "shuffle": lambda: shuffle.shuffle_set(url, out=tempfile.mkdtemp(), jobs=1),
    "stats": lambda: stats.compute(url),
    "verify": lambda: open_set(url).verify(),
    "cp": lambda: copy.copy_set(url, tempfile.mkdtemp()),
    "examples": lambda: __import__("actcache").load_examples(url),
}
out, grew = {}, 0
for name in ops:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to what is resident now: the imports' own peak does not hide this one
    before = status("VmRSS")
    try:
        run[name]()
        out[name] = "no error"
    except (ActcacheError, ValueError) as e:
        out[name] = str(e)
    grew = max(grew, (status("VmHWM") - before) / 1024)
print(json.dumps({"grew_mb": grew, "errors": out}))
"""


def _readers(url: Path | str, ops: str, env: dict[str, str] | None = None) -> dict:
    """Each reader of ``ops`` run on ``url`` in a fresh process: its error (or "no error"), and the most the process's
    peak resident memory grew above what was resident as one began (MiB)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _READERS, str(url), ops],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def zstd_set(make_config, tmp_path_factory) -> Path:
    """A real zstd set of the tiny GPT-2's blocks.1.hook_resid_post: 4 shards of 4 sequences of 32 tokens."""
    from setwriter import extract_by_stages

    root = tmp_path_factory.mktemp("width-store")
    return Path(extract_by_stages(make_config(store=str(root), codec="zstd")))


def _seal_into(store: Path, m: dict, shards: dict[int, bytes]) -> Path:
    """The set of manifest ``m`` (its id from its key) written into ``store`` with ``shards`` as its only shards, its
    records, totals and seals all agreeing: a forgery nothing but the key can tell."""
    from actcache.format import layout, records
    from actcache.format.key import key_from_dict

    m["set_id"] = key_from_dict(m["key"]).id
    out = store / m["set_id"]
    (out / "shards").mkdir(parents=True)
    kept = []
    for r in m["shards"]:
        if r["index"] in shards:
            data = shards[r["index"]]
            (out / r["file"]).write_bytes(data)
            r.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
            r["extra"]["set_id"] = m["set_id"]
            r["extra"].pop("moments", None)
            (out / layout.record_file(r["index"])).parent.mkdir(exist_ok=True)
            (out / layout.record_file(r["index"])).write_text(json.dumps(records.sealed(r)))
            kept.append(r)
    m.update(shards=kept, n_tokens=sum(r["n_tokens"] for r in kept), bytes=sum(r["bytes"] for r in kept))
    m.update(n_shards=len(kept), target_tokens=m["n_tokens"])
    m.pop("stats", None), m.pop("moments", None)
    (out / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))
    return out


def _bomb(m: dict, tokens, d: int) -> bytes:
    """Shard 0 of ``m``'s set: a zstd frame of a few KB whose header (and the data behind it) says ``d`` wide."""
    import torch
    import zstandard

    from actcache.format import shardfile

    n_seq, ctx = tokens.shape
    head, spans = shardfile.layout(
        {"activations": (torch.float16, (n_seq, ctx, d)), "tokens": (torch.int32, (n_seq, ctx))},
        {"set_id": m["set_id"], "hook": m["key"]["hook"], "index": "0"},
    )
    c = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    parts = [c.compress(head)]
    for name, (a, b) in sorted(spans.items(), key=lambda kv: kv[1]):
        parts.append(c.compress(tokens.numpy().tobytes()) if name == "tokens" else c.compress(bytes(b - a)))
    return b"".join(parts) + c.flush()


def _forge(zstd_set: Path, store: Path, key: dict, manifest: dict | None = None, mb: int = FORGED_MB) -> Path:
    """``zstd_set`` re-keyed (``key``'s fields changed, ``manifest``'s too), holding only a shard 0 whose header and
    manifest agree on a width of ``mb`` MiB per shard."""
    from actcache.format import layout, shard
    from actcache.format.key import key_from_dict

    m = json.loads((zstd_set / layout.MANIFEST).read_text())
    tokens = shard.decode((zstd_set / m["shards"][0]["file"]).read_bytes(), codec="zstd")["tokens"]
    n_seq, ctx = tokens.shape
    d = (mb << 20) // (n_seq * ctx * 2)
    m["key"].update(key)
    m.update(manifest or {})
    m.update(hook=m["key"]["hook"], d=d, hook_shape=[d], set_id=key_from_dict(m["key"]).id)
    return _seal_into(store, m, {0: _bomb(m, tokens, d)})


EVERY = "read,dataset,export,shuffle,stats"


@pytest.mark.subprocess
@pytest.mark.parametrize("hook", ["blocks.1.hook_out", "blocks.0.mlp.out.hook_in", "blocks.0.attn.k.hook_out"])
def test_a_forged_width_of_a_hook_the_old_rule_did_not_know_is_refused_before_any_shard(zstd_set, tmp_path, hook):
    """Bridge aliases and per-head hooks had no width: a forged set of them was read up to the stored-size bound
    (64 MiB for a few KB). Every hook family the tool extracts now has one: every reader refuses the manifest."""
    url = _forge(zstd_set, tmp_path, {"hook": hook})
    got = _readers(url, EVERY)
    for name, err in got["errors"].items():
        assert "is wider than a true shard of its key" in err and "\n" not in err, (name, err)
    assert got["grew_mb"] < FORGED_MB / 3, got


def _hub_model(hub, tiny_models) -> tuple[str, str]:
    """The tiny GPT-2's config.json (32 wide) as a commit of a new repo on the fake hub: (repo id, commit sha)."""
    repo = hub.new_repo_id("tiny-gpt2")
    return repo, hub.add_model(repo, {"config.json": (tiny_models["gpt2"] / "config.json").read_bytes()})


@pytest.mark.subprocess
@pytest.mark.parametrize("cached", [False, True])
def test_a_hub_models_config_is_fetched_by_the_keys_commit_and_bounds_a_forged_set(
    zstd_set, tmp_path, hub, tiny_models, cached
):
    """A hub model whose commit the reader has never downloaded: its config.json (a few KB) is fetched by the key's
    commit, checked (the hub serves it as that commit's file, its bytes are the blob the hub names) and kept, so a
    forged width is refused before any shard is read, once online and then with the hub gone."""
    repo, sha = _hub_model(hub, tiny_models)
    url = _forge(zstd_set, tmp_path, {"model": f"hf:{sha}"}, {"model": {"name": repo, "revision": sha}})
    if cached:
        assert _readers(url, "read", hub.env())["errors"]["read"].find("wider than a true shard") > 0
        hub.stop()  # what the first reader fetched is kept: no request needed
    got = _readers(url, EVERY, hub.env())
    for name, err in got["errors"].items():
        assert "d=" in err and "is wider than a true shard of its key: blocks.1.hook_resid_post" in err, (name, err)
        assert "at most 32 values per token" in err, (name, err)
    assert got["grew_mb"] < FORGED_MB / 3, got
    fetched = [r for r in hub.requests if repo in r.path]
    assert fetched and all(f"/{repo}/resolve/{sha}/config.json" == r.path for r in fetched), fetched


def test_commands_that_read_only_manifests_never_ask_the_hub(zstd_set, tmp_path, hub, tiny_models, capsys, monkeypatch):
    """`ls` and planning read manifests only: they never wait on the hub for a config (the reader of shards may)."""
    repo, sha = _hub_model(hub, tiny_models)
    url = _forge(zstd_set, tmp_path, {"model": f"hf:{sha}"}, {"model": {"name": repo, "revision": sha}})
    for name, value in hub.env().items():
        monkeypatch.setenv(name, value)
    from actcache.cli.app import main

    assert main(["ls", str(url.parent)]) == 0
    assert not [r for r in hub.requests if repo in r.path]
    width._FETCHED.clear()
    assert width.key_width(_key(f"hf:{sha}"), {"model": {"name": repo}}) == 32  # a reader's fetch
    assert [r for r in hub.requests if repo in r.path]


def test_a_hub_config_the_hub_serves_for_another_commit_or_altered_is_not_trusted(hub, tiny_models, monkeypatch):
    """What the hub answers is checked against the key before it bounds anything: a config.json whose bytes are not
    the blob the hub names is no width (the stored-size bound holds, and says why)."""
    repo, sha = _hub_model(hub, tiny_models)
    key = _key(f"hf:{sha}")
    real = width.git_blob_id
    monkeypatch.setattr(width, "git_blob_id", lambda data: real(data + b" "))  # as if the bytes were altered
    got = width.of(key, {"model": {"name": repo}})
    assert got.values is None and "bytes are not the blob the hub names" in got.why_not, got
    monkeypatch.setattr(width, "git_blob_id", real)
    width._FETCHED.clear()
    other = hub.add_model(hub.new_repo_id("other"), {"config.json": b'{"n_embd": 4096, "n_head": 32}'})
    assert width.of(_key(f"hf:{other}"), {"model": {"name": repo}}).values is None  # not a commit of that repo
    assert width.of(key, {"model": {"name": repo}}).values == 32


def test_a_failed_hub_config_fetch_is_retried_after_a_short_time_and_a_success_stays(hub, tiny_models, monkeypatch):
    """A transient hub failure was remembered for the whole process: every later reader of a long-running trainer kept
    the stored-size bound. A failure is now asked again after ``FETCH_RETRY_S`` (not at once: readers opening many
    sets do not each wait on a failing hub); a fetched config is kept for good."""
    repo, sha = _hub_model(hub, tiny_models)
    key, m = _key(f"hf:{sha}"), {"model": {"name": repo}}
    clock, retry = [1000.0], getattr(width, "FETCH_RETRY_S", 60.0)
    monkeypatch.setattr(width, "time", SimpleNamespace(monotonic=lambda: clock[0]), raising=False)
    hub.fail_next(f"/{repo}/resolve/", 500, times=100, retry_after=None)
    got = width.of(key, m)
    assert got.values is None and "the hub did not give it" in got.why_not, got
    asked = len(hub.requests_matching(repo))
    hub.clear_faults()
    clock[0] += retry / 2
    assert width.of(key, m).values is None and len(hub.requests_matching(repo)) == asked  # remembered for a while
    clock[0] += retry
    assert width.of(key, m).values == 32  # then asked again, and the hub answers now
    hub.stop()
    clock[0] += 10 * retry
    assert width.of(key, m).values == 32  # a success is kept


def test_a_hub_model_neither_cached_nor_reachable_says_so_and_how_to_make_the_bound_exact(zstd_set, tmp_path, capsys):
    """Offline, a hub commit's config.json that is not cached cannot be checked: the width is unknown, the stored-size
    bound (all that is left that a forger cannot inflate: a shard's real size) refuses a bomb, and the error says why
    the key's width did not apply and the command that fetches the config."""
    sha = "4f" * 20
    url = _forge(zstd_set, tmp_path, {"model": f"hf:{sha}"}, {"model": {"name": "org/never-fetched"}})
    from actcache.errors import ActcacheError
    from actcache.read.reader import open_set

    s = open_set(str(url))  # its width unknown: a 48 MiB forgery is within the stored-size bound's 64 MiB
    assert s.key_width is None and "the hub is offline (HF_HUB_OFFLINE)" in s.width.why_not
    assert f"`hf download org/never-fetched config.json --revision {sha}`" in s.width.why_not
    from actcache.cli.app import main

    capsys.readouterr()
    assert main(["show", str(url)]) == 0  # show says which bound holds, and why
    assert "the shards' stored size, not its key: the hub is offline" in capsys.readouterr().out
    s = open_set(str(_forge(zstd_set, tmp_path / "gib", {"model": f"hf:{sha}"}, {"model": {"name": "o/m"}}, 1024)))
    with pytest.raises(ActcacheError, match=r"decompression bomb.*key's width would bound it exactly.*hf download"):
        s.read(s.records[0])


@pytest.mark.subprocess
def test_a_shuffled_copy_is_bounded_by_its_sources_key(zstd_set, tmp_path):
    """A shuffled copy's key names its source by id; its manifest carries the source's key and model config. A copy
    whose manifest and 48 MiB shard claim a width its source's key refuses was read whole (its key had no width)."""
    import torch

    from actcache.format import layout, shard
    from actcache.read.reader import open_set
    from actcache.sets.shuffle import shuffle_set

    copy = Path(shuffle_set(str(zstd_set), out=str(tmp_path / "shuffled"), jobs=1).url)
    assert open_set(str(copy)).key_width == 32  # its source's hook_resid_post of a 32-wide model: a true copy reads
    m = json.loads((copy / layout.MANIFEST).read_text())
    n = m["shards"][0]["n_seq"]
    d = (FORGED_MB << 20) // (2 * n)
    data = shard.encode(
        {
            "activations": torch.zeros((n, d), dtype=torch.float16),
            "tokens": torch.zeros(n, dtype=torch.int32),
            "positions": torch.arange(n, dtype=torch.int64),
        },
        metadata={"set_id": m["set_id"], "index": "0"},
    ).data
    m.update(d=d, hook_shape=[d])
    url = _seal_into(tmp_path / "forged", m, {0: data})
    got = _readers(url, "read,dataset,export,stats,cp")
    for name, err in got["errors"].items():
        assert f"d={d} is wider than a true shard of its key: blocks.1.hook_resid_post" in err, (name, err)
    assert got["grew_mb"] < FORGED_MB / 3, got


@pytest.mark.subprocess
def test_a_completion_record_is_read_up_to_what_the_keys_width_needs(zstd_set, tmp_path):
    """A record holds a shard's moments: about 240 bytes per value of the width. A record padded to 48 MiB was read
    and parsed whole (the limit was 64 MiB whatever the width): verify and cp now refuse it past 1 MiB + 512 bytes per
    value, naming the record."""
    from actcache.format import layout, records

    m = json.loads((zstd_set / layout.MANIFEST).read_text())
    url = _seal_into(tmp_path, m, {0: (zstd_set / m["shards"][0]["file"]).read_bytes()})
    rec = json.loads((url / layout.record_file(0)).read_text())
    rec["extra"]["padding"] = "x" * (FORGED_MB << 20)
    (url / layout.record_file(0)).write_text(json.dumps(records.sealed(rec)))
    got = _readers(url, "verify,cp")
    assert got["grew_mb"] < FORGED_MB / 3, got
    from actcache.read.reader import open_set

    problems = open_set(str(url)).verify()
    assert any("completion record" in p and "larger than" in p for p in problems), problems
    assert records.record_cap(32) == (1 << 20) + 512 * 32 and records.record_cap(None) == records.RECORD_LIMIT


@pytest.mark.parametrize("model_config", ["kept", "dropped"])
def test_a_true_shard_that_inflates_past_the_stored_size_bound_reads_by_its_keys_width(
    zstd_set, tmp_path, monkeypatch, model_config
):
    """At the real limits: a true shard of a 263168-wide hook whose values are all 0 (a constant hook) is 67 MB, a
    few KB stored: past both the stored-size bound's free 64 MiB and its 32x. The key's model config (a local model's,
    its hashes giving the key's fingerprint) vouches for the width: it reads, with no environment variable. Without
    the config the stored-size bound refuses it as a bomb, as it refused every such set."""
    import torch

    from actcache.errors import ActcacheError
    from actcache.format import layout, shard
    from actcache.inputs.fingerprint import combine
    from actcache.read.dataset import ActivationDataset
    from actcache.read.reader import open_set

    monkeypatch.delenv("ACTCACHE_MAX_INFLATION", raising=False)
    d = (1 << 18) + 1024
    text = json.dumps({"model_type": "gpt2", "n_embd": d, "n_head": 1, "n_inner": None, "vocab_size": 512})
    files = {"config.json": hashlib.sha256(text.encode()).hexdigest(), "model.safetensors": "0" * 64}
    m = json.loads((zstd_set / layout.MANIFEST).read_text())
    m["key"]["model"] = "local:" + combine(files)[:40]
    m.update(d=d, hook_shape=[d], model_config={"files": files, "config": text})
    if model_config == "dropped":
        del m["model_config"]
    m["set_id"] = SetKey.from_dict(m["key"]).id
    tokens = shard.decode((zstd_set / m["shards"][0]["file"]).read_bytes(), codec="zstd")["tokens"]
    zeros = torch.zeros((*tokens.shape, d), dtype=torch.float16)
    meta = {"set_id": m["set_id"], "hook": m["hook"], "index": "0"}
    data = shard.encode({"activations": zeros, "tokens": tokens}, codec="zstd", level=3, metadata=meta).data
    raw = zeros.numel() * 2 + tokens.numel() * 4
    assert raw > shard.FREE_INFLATION and raw > shard.MAX_INFLATION * len(data), (raw, len(data))
    del zeros
    s = open_set(str(_seal_into(tmp_path, m, {0: data})))
    if model_config == "dropped":
        assert s.key_width is None
        with pytest.raises(ActcacheError, match="shard 0 of .* unreadable .*decompression bomb"):
            s.read(s.records[0])
        return
    assert s.key_width == d
    assert not s.read(s.records[0]).activations.any()
    assert sum(len(b) for b in ActivationDataset(s.url, batch_size=64)) == s.n_tokens


@pytest.mark.subprocess
def test_an_example_sets_rows_are_the_keys_positions_not_its_manifests(make_config, tmp_path):
    """A set of one example per sequence (--packing none) keeps the rows its key's --positions names (here 2 per
    example). A manifest resealed to say 600k rows per example, over a shard whose header agrees, was read up to the
    stored-size bound (64 MiB more than the key's shape): load_examples and ActivationDataset refuse it now."""
    import torch

    from actcache.extraction import examples
    from actcache.extraction.plan import make_plan
    from actcache.format import layout, shard

    cfg = make_config(
        store=str(tmp_path / "store"), packing="none", positions="0,-1", codec="zstd", max_tokens=256, shard_tokens=128
    )
    (url,) = examples.extract(make_plan(cfg))
    m = json.loads((Path(url) / layout.MANIFEST).read_text())
    assert m["examples"]["rows_per_example"] == 2
    t = shard.decode((Path(url) / m["shards"][0]["file"]).read_bytes(), codec="zstd")
    n, d = t["lengths"].shape[0], m["d"]
    dtype = shard.TORCH_DTYPES[m["dtype"]]
    rows = (FORGED_MB << 20) // (n * d * dtype.itemsize)
    m["examples"]["rows_per_example"] = rows
    t["activations"] = torch.zeros((n, rows, d), dtype=dtype)
    meta = {"set_id": m["set_id"], "hook": m["hook"], "index": "0"}
    data = shard.encode(t, codec="zstd", level=1, metadata=meta).data
    del t
    forged = _seal_into(tmp_path / "forged", m, {0: data})
    got = _readers(forged, "examples,dataset")
    for name, err in got["errors"].items():
        assert "shard 0 of" in err and "more than a true shard of the set's key" in err, (name, err)
    assert got["grew_mb"] < FORGED_MB / 3, got
