"""Security (issue 6): no secret in any output, trust_remote_code opt-in, no pickle, validated shards,
manifest entries that cannot escape the set.

Secrets are checked against a real moto_server with IAM auth (see tests/s3_server.py) through the CLI and
the Python API, in success and failure; the reader checks run on a real extracted set, crafted into bad ones.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from cliargs import config_argv

from actcache.config import ExtractConfig
from actcache.errors import ActcacheError
from actcache.format import layout, records, shard
from actcache.format.key import SetKey
from actcache.read.reader import open_set

CLI = str(Path(sys.executable).with_name("actcache"))
WRONG_ENV_SECRET = "wrong-env-secret-Zq81Lx0PvT"
WRONG_BLOCK_SECRET = "wrong-block-secret-Hn27Wd5RcK"


@pytest.fixture(scope="module")
def config(make_config) -> ExtractConfig:
    return make_config()


@pytest.fixture(scope="module")
def local_set(config, tmp_path_factory) -> Path:
    """A real 4-shard set on disk, written once by the flow's stages without Prefect; tests copy it before crafting
    anything."""
    from setwriter import extract_by_stages

    root = tmp_path_factory.mktemp("security-store")
    return Path(extract_by_stages(config.replace(store=str(root))))


def copy_of(local_set: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "store" / local_set.name
    shutil.copytree(local_set, dest)
    return dest


# -- secrets --------------------------------------------------------------------------------------
def extract_args(cfg: ExtractConfig, store: str) -> list[str]:
    return config_argv(cfg, store, batch_size=4)


def prefect_records() -> list[str]:
    """Every flow run's parameters, log line and artifact the session's Prefect server holds, as text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    out = []
    with get_client(sync_client=True) as client:
        runs, offset = [], 0
        while batch := client.read_flow_runs(limit=100, offset=offset):
            runs += batch
            offset += len(batch)
        for run in runs:
            out.append(json.dumps(run.parameters, default=str))
            out.append(f"{run.state_name} {run.state.message if run.state else ''}")
            offset = 0
            while logs := client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=200, offset=offset
            ):
                out += [log.message for log in logs]
                offset += len(logs)
        offset = 0
        while arts := client.read_artifacts(limit=100, offset=offset):
            out += [json.dumps([a.data, a.description, a.key], default=str) for a in arts]
            offset += len(arts)
    assert len(runs) >= 3, "expected the flow runs of this test on the session's Prefect server"
    return out


@pytest.mark.usefixtures("prefect_harness")  # extracts through the flow
@pytest.mark.subprocess
@pytest.mark.slow  # several CLI processes: `make test` runs it, `make test-fast` does not
def test_no_secret_reaches_any_output(config, s3_server, tmp_path, monkeypatch, capfd):
    """Credentials in the environment and in a Prefect block (distinct secrets), used by extract/ls/show/verify/cp
    through the CLI and the Python API, in success and failure: no secret in any object, file, output line,
    exception, flow-run parameter, log or artifact."""
    from prefect.settings import PREFECT_API_URL
    from prefect_aws import AwsCredentials

    from actcache.api import extract
    from actcache.read.dataset import ActivationDataset
    from actcache.sets.copy import copy_set

    (w_key, w_secret), (b_key, b_secret) = s3_server.keys["writer"], s3_server.keys["block"]
    assert len({w_secret, b_secret, WRONG_ENV_SECRET, WRONG_BLOCK_SECRET}) == 4
    AwsCredentials(aws_access_key_id=b_key, aws_secret_access_key=b_secret).save("sec-good", overwrite=True)
    AwsCredentials(aws_access_key_id=b_key, aws_secret_access_key=WRONG_BLOCK_SECRET).save("sec-bad", overwrite=True)
    good, reader = s3_server.env("writer"), s3_server.env("reader")
    wrong = {**good, "AWS_SECRET_ACCESS_KEY": WRONG_ENV_SECRET}  # the chain fails: only the block can work
    texts: list[str] = []

    def cli(*args: str, env: dict[str, str], ok: bool = True, expect: tuple[str, ...] = ()) -> str:
        base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        base.update(
            env,
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            AWS_EC2_METADATA_DISABLED="true",
            PREFECT_API_URL=PREFECT_API_URL.value(),
            TQDM_DISABLE="1",
        )
        p = subprocess.run([CLI, *args], env=base, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        texts.extend([p.stdout, p.stderr])
        if ok:
            assert p.returncode == 0, (args, p.stderr[-3000:])
        else:
            lines = p.stderr.strip().splitlines()
            one_line = p.returncode == 2 and len(lines) == 1
            assert one_line and any(e in lines[0] for e in expect), (args, p.stderr[-3000:])
        return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""

    url_env, url_block, url_cp = (s3_server.new_prefix() for _ in range(3))
    denied = ("access denied", "rejected the credentials")
    with ThreadPoolExecutor(3) as pool:  # independent subprocesses: ~3x faster than one after another
        env_set = pool.submit(cli, *extract_args(config, url_env), env=good)
        block_set = pool.submit(cli, *extract_args(config, url_block), "--aws-credentials-block", "sec-good", env=wrong)
        failing = [
            pool.submit(cli, "ls", url_env, env=wrong, ok=False, expect=denied),
            pool.submit(
                cli,
                *extract_args(config, s3_server.new_prefix()),
                "--aws-credentials-block",
                "sec-bad",
                env=good,
                ok=False,
                expect=denied,
            ),
        ]
        env_set, block_set = env_set.result(), block_set.result()
        set_id = env_set.rsplit("/", 1)[1]
        local = tmp_path / "copied"
        jobs = [
            pool.submit(cli, "ls", url_env, env=good),
            pool.submit(cli, "ls", url_block, "--aws-credentials-block", "sec-good", env=wrong),
            pool.submit(cli, "show", env_set, "--shards", env=good),
            pool.submit(cli, "show", block_set, "--aws-credentials-block", "sec-good", env=wrong),
            pool.submit(cli, "verify", env_set, env=good),
            pool.submit(cli, "verify", block_set, "--aws-credentials-block", "sec-good", env=wrong),
            pool.submit(
                cli, "verify", env_set, "--aws-credentials-block", "sec-bad", env=good, ok=False, expect=denied
            ),
            pool.submit(cli, "cp", block_set, str(local), "--aws-credentials-block", "sec-good", env=wrong),
        ]
        [f.result() for f in failing + jobs]
        cps = [
            pool.submit(cli, "cp", f"{local}/{set_id}", url_cp, "--dest-aws-credentials-block", "sec-good", env=wrong),
            pool.submit(
                cli, "cp", f"{local}/{set_id}", s3_server.new_prefix(), env=reader, ok=False, expect=denied[:1]
            ),
        ]
        [f.result() for f in cps]

    # The Python API in this process, the environment's secret wrong: the block is what works.
    for k, v in wrong.items():
        monkeypatch.setenv(k, v)
    s = open_set(block_set, credentials_block="sec-good")
    assert s.verify() == [] and len(list(s)) == 4
    assert next(iter(ActivationDataset(block_set, 64, credentials_block="sec-good"))).shape == (64, 32)
    copy_set(block_set, str(tmp_path / "api-copy"), src_credentials_block="sec-good")
    url_api = s3_server.new_prefix()
    assert extract(config.replace(store=url_api, aws_credentials_block="sec-good")).endswith(set_id)
    from actcache.extraction.plan import make_plan
    from actcache.tasks.fanout import verify_sets

    fanned = make_plan(config.replace(store=url_api, aws_credentials_block="sec-good"), load_model=False)
    verify_sets.fn(fanned)  # the fan-out's last step reads with the block too (it once dropped it)
    texts.append(repr(pickle.dumps(fanned)))  # the plan travels by name of the block, never its secret
    no_cache = {"skip_instance_cache": True}  # s3fs would reuse a filesystem made with other environment keys
    failures = [
        lambda: open_set(env_set, no_cache),
        lambda: open_set(env_set, credentials_block="sec-bad"),
        lambda: extract(config.replace(store=s3_server.new_prefix(), aws_credentials_block="sec-bad")),
        lambda: copy_set(f"{local}/{set_id}", s3_server.new_prefix(), dest_options=no_cache),
    ]
    for fail in failures:
        with pytest.raises(ActcacheError) as info:
            fail()
        texts += [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
    for k, v in reader.items():  # a user who may read but not write
        monkeypatch.setenv(k, v)
    with pytest.raises(ActcacheError, match="access denied") as info:
        copy_set(f"{local}/{set_id}", s3_server.new_prefix(), dest_options=no_cache)
    texts += [str(info.value), "".join(traceback.format_exception(info.value))]

    blobs = [data for url in (url_env, url_block, url_cp, url_api) for data in s3_server.keys_under(url).values()]
    blobs += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "moto" not in p.name]
    assert any(rel.endswith(layout.MANIFEST) for rel in s3_server.keys_under(url_cp)) and len(blobs) > 40
    captured = capfd.readouterr()
    texts += [captured.out, captured.err, *prefect_records()]
    for secret in (w_secret, b_secret, WRONG_ENV_SECRET, WRONG_BLOCK_SECRET, w_key, b_key):
        assert not [t for t in texts if secret in t], f"{secret[:4]}... appears in an output"
        assert not [b for b in blobs if secret.encode() in b], f"{secret[:4]}... appears in a stored file"


OLD_SECRET = "old-manifest-secret-Vb63Qe9TsM"


def test_a_credential_an_old_manifest_holds_is_never_shown_copied_or_published(local_set, tmp_path, capsys):
    """Manifests written before inputs were checked may hold a dataset URL with its password, or a model URL
    with a token in its query: show, ls, export's metadata, a shuffled or copied set's manifest, stats (which
    rewrites the manifest), verify, --like and what push would upload (manifest and card) never hold them."""
    from actcache.cli import app as cli
    from actcache.read.reader import open_set
    from actcache.sets import push

    set_dir = copy_of(local_set, tmp_path)
    m = json.loads((set_dir / layout.MANIFEST).read_text())
    m["dataset"]["path"] = f"http://reader:{OLD_SECRET}@data.example/corpus.jsonl"
    m["model"]["name"] = f"https://hub.example/m?revision=main&token={OLD_SECRET}"
    m.pop("stats", None), m.pop("moments", None)  # so that stats rewrites the manifest
    (set_dir / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))  # as the older version sealed it
    store = set_dir.parent
    outputs = []
    for argv in (
        ["show", str(set_dir)],
        ["show", str(set_dir), "--json"],
        ["ls", str(store)],
        ["export", str(set_dir), str(tmp_path / "exported"), "--format", "hf"],
        ["shuffle", str(set_dir), "--out", str(tmp_path / "shuffled")],
        ["cp", str(set_dir), str(tmp_path / "copied")],
        ["stats", str(set_dir)],
        ["verify", str(set_dir)],
        ["extract", "--like", str(set_dir), "--store", str(tmp_path / "like")],
    ):
        code = cli.main(argv)
        out = capsys.readouterr()
        outputs.append(out.out + out.err)
        assert code == (2 if argv[0] == "extract" else 0), (argv, outputs[-1])
    assert "data.example" in outputs[0] and "***" in outputs[0]  # shown, without its password
    s = open_set(str(set_dir))
    body, last = push._files(s, "someone/acts", [m])  # the card also lists manifests already in the repo
    outputs += [f.read() if isinstance(f.read(), bytes) else b"" for f in last]
    written = [
        p.read_bytes()
        for d in (tmp_path / "exported", tmp_path / "shuffled", tmp_path / "copied", store)
        for p in d.rglob("*")
        if p.is_file() and not p.name.endswith(".safetensors")
    ]
    assert len(written) > 10
    for text in [*outputs, *written]:
        blob = text if isinstance(text, bytes) else text.encode()
        assert OLD_SECRET.encode() not in blob, blob[:300]
    assert open_set(str(tmp_path / "copied" / set_dir.name)).manifest["dataset"]["path"].startswith("http://***@")


def test_a_sets_fields_cannot_drive_the_terminal_or_forge_lines(local_set, tmp_path, capsys):
    """Whoever wrote a set wrote its fields: terminal escapes (a title change, clearing the screen, colours),
    newlines, carriage returns and bidi overrides in them are shown as escapes by show, ls and error lines."""
    from actcache.cli import app as cli
    from actcache.errors import ActcacheError, report

    set_dir = copy_of(local_set, tmp_path)
    m = json.loads((set_dir / layout.MANIFEST).read_text())
    m["dataset"]["path"] = "corpus\x1b]0;owned\x07\x1b[2J\nstate       complete\r\u202etxt.exe"
    m["model"]["name"] = "model\x1b[31m"
    (set_dir / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))
    for argv in (["show", str(set_dir)], ["ls", str(set_dir.parent)]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert not any(c in out for c in "\x1b\x07\r\u202e"), out
        assert "model\\x1b[31m" in out
        if argv[0] == "show":
            assert [ln for ln in out.splitlines() if ln.startswith("dataset")] == [
                "dataset     corpus\\x1b]0;owned\\x07\\x1b[2J\\nstate       complete\\r\\u202etxt.exe "
                f"({m['dataset']['fingerprint']})"
            ]
    assert report(ActcacheError(f"bad set: {m['dataset']['path']}")) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "\x1b" not in err and "\\x1b]0;owned" in err


# -- trust_remote_code ----------------------------------------------------------------------------
def test_trust_remote_code_is_opt_in_and_recorded(config, local_set, monkeypatch):
    import transformers

    from actcache.cli.app import app

    def parsed(argv: list[str]) -> dict:
        _, bound, _ = app.parse_args(argv)
        bound.apply_defaults()
        return bound.arguments

    from actcache.extraction.plan import make_plan
    from actcache.inputs.model import ModelSpec, resolve_model

    assert ExtractConfig().trust_remote_code is False
    assert parsed(["extract"])["config"].trust_remote_code is False
    assert parsed(["extract", "--trust-remote-code"])["config"].trust_remote_code is True
    assert parsed(["hooks", "gpt2"])["trust_remote_code"] is False

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    monkeypatch.setattr("actcache.inputs.model._HEAVY", {})  # loads are cached per process: make these real
    for flag in (False, True):
        model = resolve_model(ModelSpec(config.model, trust_remote_code=flag))
        model.config, model.tokenizer  # noqa: B018 - loading them is the point
        assert seen[-2:] == [flag, flag]
    assert json.loads((local_set / layout.MANIFEST).read_text())["model"]["trust_remote_code"] is False
    plan = make_plan(config.replace(store=str(local_set.parent), trust_remote_code=True), load_model=False)
    assert plan.provenance["model"]["trust_remote_code"] is True  # what write_manifest records


# -- no pickle ------------------------------------------------------------------------------------
def test_reading_never_unpickles(local_set, monkeypatch):
    """open_set, iteration, checksummed reads, verify and the training dataset use safetensors and JSON only."""
    from actcache.read.dataset import ActivationDataset

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while reading a set")

    class NoUnpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(target, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    unpickled = []
    sys.addaudithook(lambda event, args: unpickled.append(args) if event == "pickle.find_class" else None)

    s = open_set(str(local_set))
    shards = [s.read(r, verify=True) for r in s.records]
    assert [x.index for x in shards] == [0, 1, 2, 3] and len(list(s)) == 4 and s.verify() == []
    rows = sum(len(b) for b in ActivationDataset(str(local_set), 100, shuffle_buffer=256, seed=1, verify=True))
    assert rows == 512 and not unpickled
    with pytest.raises(AssertionError, match="pickle used"):  # the guard itself works
        torch.load(local_set / layout.MANIFEST)


# -- shards validated before use ------------------------------------------------------------------
def _safetensors(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _bad_shards(good: bytes) -> dict[str, tuple[bytes, str]]:
    n = struct.unpack("<Q", good[:8])[0]
    header, body = json.loads(good[8 : 8 + n]), good[8 + n :]
    acts = shard.decode(good, codec="none")["activations"]
    tokens = shard.decode(good, codec="none")["tokens"]

    def edited(name: str, **change) -> bytes:
        h = json.loads(json.dumps(header))
        h[name].update(change)
        return _safetensors(h, body)

    start, _ = header["activations"]["data_offsets"]
    return {
        "offsets beyond the file": (edited("activations", data_offsets=[start, len(body) + 4096]), "offset"),
        "header longer than the file": (struct.pack("<Q", 1 << 40) + good[8:], "header too large"),
        "shape not matching its bytes": (
            edited("activations", shape=[9, 9, 9, 9]),
            "expected torch.float16[4, 32, 32]",
        ),
        "header not JSON": (struct.pack("<Q", 6) + b"{'x':1" + body, "invalid JSON"),
        "truncated": (good[:5], "header too small"),
        "shape not the manifest's": (
            shard.encode({"activations": acts[:, :, :16].contiguous(), "tokens": tokens}).data,
            "expected torch.float16[4, 32, 32]",
        ),
        "dtype not the manifest's": (
            shard.encode({"activations": acts.float(), "tokens": tokens}).data,
            "is torch.float32",
        ),
        "tokens missing": (shard.encode({"activations": acts}).data, "no tensor 'tokens'"),
    }


def _plant(set_dir: Path, index: int, data: bytes) -> None:
    """Put ``data`` in as shard ``index`` with a manifest that vouches for it (the checksum passes)."""
    import hashlib

    m = json.loads((set_dir / layout.MANIFEST).read_text())
    rec = m["shards"][index]
    (set_dir / rec["file"]).write_bytes(data)
    rec.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    m["bytes"] = sum(r["bytes"] for r in m["shards"])
    (set_dir / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))  # a forgery the seal cannot see


@pytest.mark.usefixtures("prefect_harness")  # extracts through the flow
def test_malformed_shards_give_a_clear_error(config, local_set, tmp_path):
    """Shards whose records vouch for them (checksums match) but whose structure is wrong: reading refuses them in
    one line, verify checks each header and says --verify-existing repairs it, and it does."""
    from actcache.api import extract
    from actcache.read.dataset import ActivationDataset

    good = (local_set / layout.shard_file(0, "none")).read_bytes()
    for case, (data, reason) in _bad_shards(good).items():
        set_dir = copy_of(local_set, tmp_path / case.replace(" ", "-"))
        _plant(set_dir, 0, data)
        s = open_set(str(set_dir))
        problems = s.verify()  # the checksum matches: only the structure is wrong
        assert any("header" in p for p in problems), (case, problems)  # (and its record disagrees: _plant left it)
        assert all(p.startswith("shard 0: ") for p in problems), (case, problems)
        with pytest.raises(ActcacheError) as direct:
            s.read(s.records[0], verify=True)
        with pytest.raises(ActcacheError) as streamed:
            list(ActivationDataset(str(set_dir), 64))
        for msg in (str(direct.value), str(streamed.value)):
            assert msg.startswith("shard 0 of ") and "is unreadable" in msg and reason in msg, (case, msg)
            assert "\n" not in msg
    # The rerun verify's hint names: plain when the mtimes give the planted shard away, else --verify-existing.
    extract(config.replace(store=str(set_dir.parent), verify_existing=not all(p.plain_rerun for p in problems)))
    assert open_set(str(set_dir)).verify() == []
    assert (set_dir / layout.shard_file(0, "none")).read_bytes() == good


def _zstd_copy(local_set: Path, tmp_path: Path) -> Path:
    """The set re-encoded with codec zstd under its own (new) id: manifest sealed, records and totals right. (A true
    set that compresses far better than activations, at the real limits: tests/actcache/format/test_width.py.)"""
    import hashlib

    src = copy_of(local_set, tmp_path)
    m = json.loads((src / layout.MANIFEST).read_text())
    m["key"].update(codec="zstd", codec_level=3)
    m.update(codec="zstd", codec_level=3, set_id=SetKey.from_dict(m["key"]).id)
    set_dir = src.parent / m["set_id"]
    (set_dir / "shards").mkdir(parents=True)
    for r in m["shards"]:
        tensors = shard.decode((src / r["file"]).read_bytes(), codec="none")
        data = shard.encode(tensors, codec="zstd").data
        r.update(file=layout.shard_file(r["index"], "zstd"), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        r["extra"]["set_id"] = m["set_id"]  # the records of this set, not of the one it was made from
        (set_dir / r["file"]).write_bytes(data)
    m["bytes"] = sum(r["bytes"] for r in m["shards"])
    (set_dir / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))
    return set_dir


BOMB = struct.pack("<I", 0xFD2FB528) + bytes([3 << 6, 10 << 3]) + struct.pack("<Q", 8 << 30) + bytes([1, 0, 0])


@pytest.mark.parametrize(
    "case",
    [
        "frame claims 8 GB",
        "n_seq edited beyond the key",
        "d edited in the manifest",
        "d edited, the model's config dropped",
        "record claims 1 TiB stored",
        "bomb behind a valid header",
    ],
)
def test_zstd_shards_cannot_make_a_reader_allocate_more_than_a_true_shard(local_set, tmp_path, case, capsys):
    """A zstd shard is a few bytes that may claim (or inflate to) any size, and a manifest may be edited and
    resealed: what bounds the output is the key (dtype, context, at most seqs_per_shard sequences) and the
    shard's own header, checked before any tensor data is decompressed."""
    import resource

    import zstandard

    set_dir = _zstd_copy(local_set, tmp_path)
    assert open_set(str(set_dir)).read(open_set(str(set_dir)).records[1]).activations.shape == (4, 32, 32)
    m = json.loads((set_dir / layout.MANIFEST).read_text())
    if case == "frame claims 8 GB":
        _plant(set_dir, 0, BOMB)
        expected = r"shard 0 of .* unreadable \(zstd frame declares 8589934592 bytes"
    elif case == "n_seq edited beyond the key":  # the case: 131 KB that allocated 4 GB
        m["shards"][0].update(n_seq=4 << 20, n_tokens=32 * (4 << 20))
        m["n_tokens"] = sum(r["n_tokens"] for r in m["shards"])
        (set_dir / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))
        with pytest.raises(ActcacheError, match="claims 4194304 sequences.*allows 1..4 sequences"):
            open_set(str(set_dir))
        return
    elif case == "d edited in the manifest":  # the model's config (checked against the key) gives the hook's width
        m.update(d=1 << 28, hook_shape=[1 << 28])
        (set_dir / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))
        wider = r"malformed \(d=268435456 is wider than a true shard of its key: .* at most 32 values per token"
        with pytest.raises(ActcacheError, match=wider):
            open_set(str(set_dir))
        from actcache.cli.app import main

        assert main(["verify", str(set_dir)]) != 0  # verify names it, in one last line
        err = capsys.readouterr().err.strip().splitlines()
        assert "d=268435456 is wider than a true shard of its key" in err[-1], err
        return
    elif case == "d edited, the model's config dropped":  # no width from the key: the shard's header must agree
        m.update(d=1 << 28, hook_shape=[1 << 28])
        del m["model_config"]
        (set_dir / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))
        expected = r"shard 0 of .* unreadable .*expected torch.float16\[4, 32, 268435456\]"
    elif case == "record claims 1 TiB stored":  # on an object store, reading it would allocate what it claims
        m["shards"][0]["bytes"] = 1 << 40
        m["bytes"] = sum(r["bytes"] for r in m["shards"])
        (set_dir / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))
        expected = r"shard 0 of .* claims 1099511627776 stored bytes, more than a true shard of its key \(\d+ bytes\)"
    else:  # the header is a true shard's; the rest of the frame inflates without end
        good = shard.decode((set_dir / m["shards"][0]["file"]).read_bytes(), codec="zstd")
        raw = shard.encode(good).data
        start = 8 + int.from_bytes(raw[:8], "little")
        c = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
        data = c.compress(raw[:start]) + b"".join(c.compress(bytes(1 << 20)) for _ in range(64)) + c.flush()
        _plant(set_dir, 0, data)
        expected = r"shard 0 of .* unreadable \(zstd frame does not hold exactly the \d+ bytes its header promises"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = open_set(str(set_dir))
    with pytest.raises(ActcacheError, match=expected):
        s.read(s.records[0])
    if case == "record claims 1 TiB stored":  # cp reads shards as stored: named before it reads one too
        from actcache.sets.copy import copy_set

        with pytest.raises(ActcacheError, match=expected):
            copy_set(str(set_dir), str(tmp_path / "copy"))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 32 << 10  # KB: never the claimed size


_EVERY_READER = """
import json, resource, sys, tempfile
from actcache.errors import ActcacheError

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

def each_reader(url):
    from actcache.read.dataset import ActivationDataset
    from actcache.read.reader import open_set
    from actcache.sets import export, shuffle, stats

    yield "read", lambda: open_set(url).read(open_set(url).records[0])
    yield "dataset", lambda: list(ActivationDataset(url, batch_size=16, shuffle_buffer=64))
    yield "export", lambda: export.export_set(url, tempfile.mkdtemp() + "/out", format="hf")
    yield "shuffle", lambda: shuffle.shuffle_set(url, out=tempfile.mkdtemp(), jobs=1)
    yield "stats", lambda: stats.compute(url)

url, = sys.argv[1:]
import torch, zstandard, actcache.sets.export, actcache.sets.shuffle, actcache.read.dataset  # noqa
base, out = peak_mb(), {}
for name, run in each_reader(url):
    try:
        run()
        out[name] = "no error"
    except (ActcacheError, ValueError) as e:
        out[name] = str(e)
print(json.dumps({"base_mb": base, "peak_mb": peak_mb(), "errors": out}))
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("model_config", ["kept", "dropped"])
def test_a_forged_width_with_a_bomb_behind_it_costs_no_reader_memory(local_set, tmp_path, model_config):
    """The issue's forgery: a manifest resealed with a huge d and a shard whose header agrees, its data a few KB of
    zstd that inflates to 1 GiB. The key's model config (checked against its fingerprint) gives the hook's width:
    every reader refuses the manifest in one line before reading a shard. Where the manifest carries no config
    (dropped, or a set older than it), every field agrees with every other, so only what the shard is stored as
    tells: read, ActivationDataset, export, shuffle and stats each refuse it in one line naming the bomb. Either
    way the process's peak memory stays near what the imports cost (it was gigabytes)."""
    import zstandard

    from actcache.format import shardfile

    set_dir = _zstd_copy(local_set, tmp_path)
    m = json.loads((set_dir / layout.MANIFEST).read_text())
    n_seq, ctx, d = 4, 32, 1 << 22  # 4 x 32 x 4M float16: 1 GiB
    good = shard.decode((set_dir / m["shards"][0]["file"]).read_bytes(), codec="zstd")
    head, spans = shardfile.layout(
        {"activations": (torch.float16, (n_seq, ctx, d)), "tokens": (torch.int32, (n_seq, ctx))},
        {"set_id": m["set_id"], "hook": m["hook"], "index": "0"},
    )
    c = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    parts = [c.compress(head)]
    for name, (a, b) in sorted(spans.items(), key=lambda kv: kv[1]):
        if name == "tokens":
            parts.append(c.compress(good["tokens"].numpy().tobytes()))
        else:
            parts += [c.compress(bytes(16 << 20)) for _ in range((b - a) // (16 << 20))]
    data = b"".join(parts) + c.flush()
    assert len(data) < 256 << 10  # a few KB on disk, 1 GiB inflated
    m.update(d=d, hook_shape=[d])
    assert m["model_config"]["files"]["config.json"]  # what the extraction wrote
    if model_config == "dropped":
        del m["model_config"]
    m.pop("stats", None), m.pop("moments", None)  # so that stats reads the shards
    for r in m["shards"]:
        r["extra"].pop("moments", None)
    _plant_sealed(set_dir, m, 0, data)
    proc = subprocess.run(
        [sys.executable, "-c", _EVERY_READER, str(set_dir)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, err in got["errors"].items():
        if model_config == "kept":
            assert "d=4194304 is wider than a true shard of its key" in err and "\n" not in err, (name, err)
        else:
            assert "decompression bomb" in err and "shard 0" in err and "\n" not in err, (name, err)
    assert got["peak_mb"] - got["base_mb"] < 300, got  # a true shard of this set is 40 KB; the bomb 1 GiB


@pytest.mark.parametrize("options", [{"shuffle_buffer": 4096}, {}, {"dtype": torch.float32}])
def test_activation_dataset_sizes_no_buffer_by_a_width_no_shard_vouches_for(local_set, tmp_path, options):
    """ActivationDataset sized its shuffle buffer (and cast scratch) by the manifest's d before reading a shard:
    a resealed d = 2^30 was a raw allocator error for 1 TB. A first shard's header now vouches for d first, and
    the error names the damage. (Without the model's config: with it, ``open_set`` refuses such a d at once.)"""
    set_dir = copy_of(local_set, tmp_path)
    m = json.loads((set_dir / layout.MANIFEST).read_text())
    m.update(d=1 << 30, hook_shape=[1 << 30])
    del m["model_config"]
    (set_dir / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))
    from actcache.read.dataset import ActivationDataset

    with pytest.raises(ActcacheError, match=r"shard 0 of .* unreadable .*expected torch.float16\[4, 32, 1073741824\]"):
        list(ActivationDataset(str(set_dir), batch_size=8, **options))


def _plant_sealed(set_dir: Path, m: dict, index: int, data: bytes) -> None:
    """Shard ``index`` replaced by ``data``, with a manifest ``m`` and a record that vouch for it, both resealed."""
    import hashlib

    rec = m["shards"][index]
    (set_dir / rec["file"]).write_bytes(data)
    rec.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    m["bytes"] = sum(r["bytes"] for r in m["shards"])
    (set_dir / layout.MANIFEST).write_text(json.dumps(records.sealed(m)))
    for r in m["shards"]:
        (set_dir / layout.record_file(r["index"])).parent.mkdir(exist_ok=True)
        (set_dir / layout.record_file(r["index"])).write_text(json.dumps(records.sealed(r)))


@pytest.mark.usefixtures("prefect_harness")  # extracts through the flow
@pytest.mark.parametrize(
    "kind",
    [
        "symlink to /dev/zero",
        "FIFO",
        "symlink to a valid shard outside the set",
        "symlinked shards folder",
        "manifest a symlink to another set's",
    ],
)
def test_only_regular_files_inside_the_set_are_read(config, local_set, tmp_path, kind):
    """A shard replaced by a link or a FIFO is never followed or waited on: reading, streaming, verify and cp
    say so in one line, verify says a rerun repairs it, and the rerun does (what a link pointed to is untouched)."""
    import threading

    from actcache.read.dataset import ActivationDataset
    from actcache.sets.copy import copy_set

    set_dir = copy_of(local_set, tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(set_dir / "shards", outside)
    victim = set_dir / layout.shard_file(1, "none")
    if kind == "symlink to /dev/zero":
        victim.unlink()
        victim.symlink_to("/dev/zero")
    elif kind == "FIFO":
        victim.unlink()
        os.mkfifo(victim)
    elif kind == "symlink to a valid shard outside the set":
        victim.unlink()
        victim.symlink_to(outside / victim.name)  # the right bytes, even: still not read
    elif kind == "symlinked shards folder":
        shutil.rmtree(set_dir / "shards")
        (set_dir / "shards").symlink_to(outside)
    else:
        other = set_dir.parent / "elsewhere"
        other.mkdir()
        (other / layout.MANIFEST).write_bytes((set_dir / layout.MANIFEST).read_bytes())
        (set_dir / layout.MANIFEST).unlink()
        (set_dir / layout.MANIFEST).symlink_to(other / layout.MANIFEST)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}

    def bounded(fn):
        out = {}

        def run():
            try:
                out["value"] = fn()
            except BaseException as e:  # handed back below
                out["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), f"{kind}: a read blocked"
        return out

    if kind.startswith("manifest"):
        out = bounded(lambda: open_set(str(set_dir)))
        assert isinstance(out.get("error"), ActcacheError) and "symlink" in str(out["error"]), out
    else:
        s = open_set(str(set_dir))
        for fn in (
            lambda: s.read(s.records[1]),
            lambda: list(ActivationDataset(str(set_dir), 64)),
            lambda: copy_set(str(set_dir), str(tmp_path / "copy")),
        ):
            out = bounded(fn)
            err = out.get("error")
            assert isinstance(err, ActcacheError) and "\n" not in str(err), (kind, out)
            assert "shard " in str(err) and ("symlink" in str(err) or "regular file" in str(err)), str(err)
        problems = bounded(s.verify)["value"]
        assert any(p.startswith("shard 1:") for p in problems) and all(p.plain_rerun for p in problems), problems

    from actcache.api import extract

    extract(config.replace(store=str(set_dir.parent)))
    assert not victim.is_symlink() and victim.is_file() and open_set(str(set_dir)).verify() == []
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


@pytest.mark.parametrize("kind", ["FIFO", "symlink to a valid shard outside the set"])
@pytest.mark.parametrize("command", ["shuffle", "export", pytest.param("push", marks=pytest.mark.hub)])
def test_commands_that_read_whole_sets_read_only_regular_files(extracted_set, tmp_path, capsys, request, command, kind):
    """shuffle, export and push read shards as every reader does (tensors.read, Store.read_range/regular_path):
    a FIFO is refused at once, a link is not followed, in one line with exit 1, and nothing is uploaded."""
    from actcache.cli import app as cli

    set_dir = tmp_path / "store" / Path(extracted_set).name
    shutil.copytree(extracted_set, set_dir)
    victim = set_dir / layout.shard_file(1, "none")
    outside = tmp_path / "outside.safetensors"
    victim.rename(outside)
    if kind == "FIFO":
        os.mkfifo(victim)
    else:
        victim.symlink_to(outside)
    argv = {
        "shuffle": ["shuffle", str(set_dir), "--out", str(tmp_path / "shuffled")],
        "export": ["export", str(set_dir), str(tmp_path / "exported"), "--format", "hf"],
        "push": ["push", str(set_dir), "REPO"],
    }[command]
    if command == "push":
        hub = request.getfixturevalue("hub")
        argv[-1] = hub.new_repo_id("refused")
        hub.clear_requests()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("actcache: error: ") and ("shard 1 of" in err[-1] or "000001" in err[-1]), err
    assert "symlink" in err[-1] or "regular file" in err[-1], err
    assert not any("Traceback" in line for line in err)
    if command == "export":
        assert not (tmp_path / "exported").exists()
    if command == "push":
        assert not hub.requests_matching(rf"/{argv[-1]}/commit/")


# -- nothing escapes the store --------------------------------------------------------------------
ESCAPES = [
    "../../outside/secret.safetensors",
    "/etc/passwd",
    "s3://other-bucket/x/shards/000000.safetensors",
    "file:///etc/passwd",
    "shards/../../../outside/secret.safetensors",
    "shards/000000.safetensors/../../x",
    "shards/000000.safetensors\n",
    "shards/\u0660\u0660\u0660\u0660\u0660\u0660.safetensors",
    "done/000000.json",
    "memory://shards/000000.safetensors",
    "shards/000001.safetensors",
]


@pytest.mark.parametrize("entry", ESCAPES, ids=[repr(e)[1:-1] for e in ESCAPES])
def test_manifest_entries_cannot_escape_the_set(local_set, tmp_path, entry):
    """A hand-crafted manifest names another file for shard 0: the reader refuses it before opening anything,
    and no file outside the set folder is ever opened (seen through Python's audit hook for every open)."""
    set_dir = copy_of(local_set, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes((set_dir / layout.shard_file(0, "none")).read_bytes())
    m = json.loads((set_dir / layout.MANIFEST).read_text())
    m["shards"][0]["file"] = entry
    (set_dir / layout.MANIFEST).write_text(json.dumps(m))

    opened: list[str] = []
    watching = [True]
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if watching and event == "open" else None)
    try:
        with pytest.raises(ActcacheError, match=r"manifest of .* is malformed \(.*\); regenerate it"):
            open_set(str(set_dir))
        from actcache.sets.copy import copy_set

        with pytest.raises(ActcacheError, match="is malformed"):
            copy_set(str(set_dir), str(tmp_path / "dest"))
    finally:
        watching.clear()
    ours = [p for p in opened if p.startswith(str(tmp_path))]
    assert ours and all(p.startswith(str(set_dir) + os.sep) for p in ours), ours
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize(
    "set_id", ["..", "../outside", "0123456789abcdef01234567\n", "/etc", "t..", "0123456789ABCDEF01234567"]
)
def test_set_ids_are_checked(local_set, tmp_path, set_id):
    store = copy_of(local_set, tmp_path).parent
    with pytest.raises(ActcacheError, match="is not a set id"):
        from actcache.format import manifest
        from actcache.storage.store import Store

        manifest.read(Store(str(store)), set_id)


@pytest.mark.subprocess
def test_cli_refuses_a_malicious_manifest_in_one_line(local_set, tmp_path):
    set_dir = copy_of(local_set, tmp_path)
    m = json.loads((set_dir / layout.MANIFEST).read_text())
    m["shards"][2]["file"] = "../../../etc/passwd"
    (set_dir / layout.MANIFEST).write_text(json.dumps(m))
    for cmd in (["verify", str(set_dir)], ["show", str(set_dir)], ["cp", str(set_dir), str(tmp_path / "d")]):
        p = subprocess.run([CLI, *cmd], capture_output=True, text=True, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and "not a shard path: '../../../etc/passwd'" in lines[0], p.stderr
    assert not (tmp_path / "d").exists()
