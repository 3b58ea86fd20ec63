"""Bad input: one line naming the problem and the fix, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from actcache.cli.app import main


@pytest.fixture
def argv(tiny_models, corpus, store):
    return [
        "extract",
        "--model",
        str(tiny_models["gpt2"]),
        "--dataset",
        str(corpus),
        "--store",
        str(store),
        "--context-size",
        "32",
        "--max-tokens",
        "512",
        "--shard-tokens",
        "128",
        "--device",
        "cpu",
    ]


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (a value may carry further ``--flag value`` pairs)."""
    out = list(argv)
    first, *rest = [value] if value.startswith(("{", "[")) else value.split(" --")
    pairs = [(flag, first)] + [tuple(("--" + r).split(" ", 1)) for r in rest]
    for f, v in pairs:
        if f in out:
            out[out.index(f) + 1] = v
        else:
            out += [f, v]
    return out


def _files(tmp_path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}


def _empty(tmp_path: Path) -> str:
    p = tmp_path / "empty.txt"
    p.write_text("\n\n")
    return str(p)


def _other_column(tmp_path: Path) -> str:
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(json.dumps({"body": f"document {i}", "id": i}) for i in range(5)))
    return str(p)


def _a_file(tmp_path: Path) -> str:
    p = tmp_path / "not-a-dir"
    p.write_text("x")
    return str(p)


CASES = [
    # (flag, value or factory, expected fragment of the one-line message)
    ("--model", "/nonexistent/model-dir", "not found"),
    ("--model", "no-such-org/no-such-model", "not found"),
    ("--model", "builtin:tiny-bert", "unknown builtin model"),
    ("--hook", "blocks.1.hook_resid_pots", "did you mean blocks.1.hook_resid_post"),
    ("--hook", "blocks.9.hook_resid_post", "out of range"),
    ("--hook", "blocks.0.attn.hook_pattern", "not one vector per token"),
    ("--context-size", "4096 --max-tokens 8192 --shard-tokens 8192", "above the maximum of 128"),
    ("--dataset", "/nonexistent/corpus.txt", "not found"),
    ("--dataset", _empty, "is empty"),
    ("--dataset", _other_column, "its columns are ['body', 'id']"),
    ("--max-tokens", "10", "below one context"),
    ("--max-tokens", "lots", "invalid int value"),
    ("--shard-bytes", "4096 --shard-tokens 0", "--shard-bytes must be at least 1 MiB"),
    ("--batch-size", "-1", "--batch-size must be at least 1 (or 0: automatic)"),
    ("--dtype", "float8", "unsupported --dtype 'float8'; choose one of float32, float16, bfloat16"),
    ("--codec", "lz4", "unsupported --codec 'lz4'"),
    ("--store", "/sys/actcache-store", "not writable"),
    ("--store", "/proc/nope", "'/proc/nope' (--store): '/proc', the nearest folder of it that exists, takes no new"),
    ("--store", _a_file, "is a file"),
    ("--storage-options", "{endpoint_url: x}", "--storage-options is not valid JSON"),
    ("--storage-options", "[1, 2]", "must be a JSON object"),
]


@pytest.mark.parametrize("flag,value,expected", CASES, ids=[f"{c[0]}={getattr(c[1], '__name__', c[1])}" for c in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(argv, tmp_path, capsys, flag, value, expected):
    value = value(tmp_path) if callable(value) else value
    before = _files(tmp_path)
    code = main(_set(argv, flag, value))
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("actcache: error: ") and expected in err, err
    assert _files(tmp_path) == before, "bad input must leave the filesystem as it was"
    assert not (tmp_path / "store").exists()


@pytest.mark.subprocess
def test_real_process_exits_non_zero_without_traceback(argv, store):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "actcache.cli.app", *_set(argv, "--hook", "blocks.1.hook_mlp_outt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("actcache: error: unknown hook 'blocks.1.hook_mlp_outt'")
    assert "blocks.1.hook_mlp_out" in proc.stderr
    assert not store.exists()


def test_hooks_lists_valid_names(tiny_models, capsys):
    assert main(["hooks", str(tiny_models["llama"])]) == 0
    names = capsys.readouterr().out.split()
    assert "blocks.2.hook_resid_post" in names and "blocks.0.attn.hook_z" in names


# -- conventions: version, help, JSON, exit codes, a quiet terminal -------------------------------------------
def test_version_has_one_source(capsys):
    from importlib.metadata import version

    import actcache

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"actcache {version('actcache')}" == f"actcache {actcache.__version__}"


def test_help_renders_every_choice_default_and_exit_code(capsys):
    from actcache.cli.app import app

    assert main(["--help"]) == 0
    top = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "Exit codes: 0 success; 1 failure" in top and "2 bad input" in top
    assert re.search(r"Parameters ─+╮ --debug Print the whole chain of causes", top), top  # the table, not the epilogue
    for command in (
        "extract",
        "ls",
        "show",
        "verify",
        "diff",
        "cp",
        "hooks",
        "rm",
        "gc",
        "shuffle",
        "export",
        "push",
        "stats",
    ):
        assert command in app and f" {command} " in top
        assert main([command, "--help"]) == 0, command
        text = " ".join(capsys.readouterr().out.replace("│", " ").split())
        assert text.startswith(f"Usage: actcache {command}"), text[:200]
        if command in ("ls", "show", "verify", "diff", "rm", "gc", "stats"):
            assert "--json" in text, command
        assert "--debug Print the whole chain of causes" in text, command  # in the option table, with its help
    assert main(["extract", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    for choices in (
        "[choices: float32, float16, bfloat16]",
        "[choices: none, zstd, shuffle-zstd]",
        "[choices: eos, bos, none]",
    ):
        assert choices in text
    assert "under about 2% of a GPU" in text and "[default: 268435456]" in text  # a '%' renders
    assert "--no-prepend-bos" in text and "--no-streaming" in text and "[default: True]" in text
    import dataclasses

    from actcache.config import ExtractConfig

    assert [f.name for f in dataclasses.fields(ExtractConfig) if f"--{f.name.replace('_', '-')} " not in text] == []


@pytest.mark.subprocess
def test_telemetry_notice_stays_off_a_terminal(tmp_path):
    """Prefect prints its telemetry notice on import when stdout/stderr is a terminal; the CLI's defaults stop it."""
    import pty

    ci = {
        "CI",
        "GITHUB_ACTIONS",
        "GITLAB_CI",
        "JENKINS_URL",
        "TRAVIS",
        "CIRCLECI",
        "BUILDKITE",
        "TF_BUILD",
        "CODEBUILD_BUILD_ID",
        "BITBUCKET_COMMIT",
        "TEAMCITY_VERSION",
        "DRONE",
        "SEMAPHORE",
        "APPVEYOR",
        "BUDDY",
        "CI_NAME",
    }  # Prefect stays quiet in CI by itself: a CI variable would hide the notice from the control

    def on_a_terminal(code: str, home: str) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ci and k != "DO_NOT_TRACK"}
        env.update(PREFECT_HOME=str(tmp_path / home), PYTHONWARNINGS="ignore")
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True
        )
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=120)
        os.close(leader)
        return out.decode(errors="replace")

    assert "anonymous usage data" in on_a_terminal("import prefect", "control")  # the notice exists
    assert "anonymous usage data" not in on_a_terminal(
        "from actcache.cli import app as cli; cli._quiet_defaults(); import prefect", "cli"
    )


@pytest.fixture(scope="module")
def made(tiny_models, corpus, prefect_harness, tmp_path_factory) -> dict:
    """One two-hook extraction through the CLI with --json (its output, for the tests below)."""
    store = tmp_path_factory.mktemp("json") / "store"
    argv = [
        "extract",
        "--model",
        str(tiny_models["gpt2"]),
        "--dataset",
        str(corpus),
        "--store",
        str(store),
        "--hook",
        "blocks.0.hook_resid_post,blocks.1.hook_resid_post",
        "--context-size",
        "32",
        "--max-tokens",
        "384",
        "--shard-tokens",
        "128",
        "--device",
        "cpu",
        "--json",
    ]
    return {"argv": argv, "store": store}


def test_json_documents(made, capsys):
    assert main(made["argv"]) == 0
    first = json.loads(capsys.readouterr().out)
    a, b = first["sets"]
    assert [a["hook"], b["hook"]] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert a["n_shards"] == 3 and a["shards_computed"] == 3 and a["shards_skipped"] == 0
    assert a["complete"] and a["n_tokens"] == 384 and a["bytes"] > 0 and a["url"].endswith(a["set_id"])

    assert main(made["argv"]) == 0  # again: everything is there
    again = json.loads(capsys.readouterr().out)
    assert [(s["shards_computed"], s["shards_skipped"]) for s in again["sets"]] == [(0, 3), (0, 3)]

    assert main(["ls", str(made["store"]), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["store"] == str(made["store"])
    assert {s["set_id"]: (s["state"], s["n_tokens"], s["n_shards"]) for s in listed["sets"]} == {
        a["set_id"]: ("complete", 384, 3),
        b["set_id"]: ("complete", 384, 3),
    }

    assert main(["show", a["url"], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["url"] == a["url"] and shown["set_id"] == a["set_id"] and "shards" not in shown
    assert main(["show", a["url"], "--json", "--shards"]) == 0
    assert [s["index"] for s in json.loads(capsys.readouterr().out)["shards"]] == [0, 1, 2]

    assert main(["verify", a["url"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "url": a["url"],
        "ok": True,
        "n_shards": 3,
        "n_tokens": 384,
        "n_target_shards": 3,
        "missing": [],
        "n_missing": 0,
        "problems": [],
    }
    (Path(a["url"]) / "shards" / "000001.safetensors").write_bytes(b"broken")
    code = main(["verify", a["url"], "--json"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == 1 and not report["ok"] and "shard 1" in report["problems"][0]
    assert err == "verify: 3/3 shards\n"  # progress only: the problems are in the document

    lower = [a if a != "blocks.0.hook_resid_post,blocks.1.hook_resid_post" else b["hook"] for a in made["argv"]]
    lower[lower.index("--max-tokens") + 1] = "128"  # asks for one shard: the counts still describe the whole set
    assert main(lower) == 0
    (low,) = json.loads(capsys.readouterr().out)["sets"]
    assert (low["n_shards"], low["n_tokens"], low["shards_computed"]) == (3, 384, 0)


# -- a shuffled copy (the "rows" layout) where commands expect an extracted set -----------------------------
@pytest.fixture(scope="module")
def shuffled(extracted_set, tmp_path_factory) -> dict:
    """A copy of the shared set's store (set and token cache) with a shuffled copy of the set beside."""
    import shutil

    from actcache.sets.shuffle import shuffle_set

    store = tmp_path_factory.mktemp("rows") / "store"
    shutil.copytree(Path(extracted_set).parent, store)
    source = str(store / Path(extracted_set).name)
    return {"store": store, "source": source, "rows": shuffle_set(source, seed=3).url}


def test_a_shuffled_copy_is_described_and_refused_where_it_cannot_serve(shuffled, tmp_path, capsys):
    rows, source = shuffled["rows"], shuffled["source"]
    source_id = source.rsplit("/", 1)[1]
    assert main(["show", rows]) == 0
    text = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert text["rows"].startswith(f"448 in 4 shards of up to 128, shuffled copy of {source_id} (seed 3, 0 rows")
    assert main(["show", rows, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["url"], shown["layout"], shown["seed"]) == (rows, "rows", 3)

    assert main(["ls", str(shuffled["store"]), "--json"]) == 0
    listed = {s["url"]: s for s in json.loads(capsys.readouterr().out)["sets"]}
    assert (listed[rows]["layout"], listed[rows]["state"], listed[rows]["tokens_id"]) == ("rows", "complete", None)
    assert listed[source]["layout"] is None and listed[source]["tokens_id"]

    for argv, expected in (
        (["diff", source, rows], "is a shuffled copy (rows); diff compares extracted sets"),
        (
            ["extract", "--like", rows, "--store", str(tmp_path / "s")],
            f"is a shuffled copy; reproduce its source ({source_id}) with --like",
        ),
    ):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "s").exists()

    # the source's token cache is kept while the source exists; the shuffled copy needs none
    assert main(["gc", str(shuffled["store"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == []
    assert main(["rm", source, "--yes"]) == 0
    capsys.readouterr()
    assert main(["gc", str(shuffled["store"]), "--json", "--older-than", "0"]) == 0  # no extraction may be using it
    garbage = json.loads(capsys.readouterr().out)["items"]
    assert [(g["kind"], g["url"]) for g in garbage] == [
        ("token-cache", f"{shuffled['store']}/_tokens/{listed[source]['tokens_id']}")
    ]
    assert main(["verify", rows]) == 0  # the shuffled copy stands alone


@pytest.mark.usefixtures("prefect_harness")
def test_verify_fails_on_an_incomplete_set_and_says_how_many_shards_are_missing(base_config, capsys):
    from actcache.flows.extract import extract_activations

    [url] = extract_activations(base_config, partition_index=1, num_partitions=2)  # shards 1 and 3 of 4
    assert main(["verify", url]) == 1
    err = capsys.readouterr().err
    assert "incomplete: 2 of 4 shards missing (indices 0, 2)" in err and ", 2 of 4 shards missing;" in err
    extract_activations(base_config)
    assert main(["verify", url]) == 0 and "OK: 4 shards" in capsys.readouterr().out


@pytest.mark.subprocess
def test_verify_checks_headers_without_importing_torch(extracted_set, tmp_path):
    """verify re-hashes every shard and checks its safetensors header against the manifest with JSON and sizes
    alone: a fresh interpreter never imports torch (seconds of start-up), and a header that disagrees is found."""
    import hashlib
    import shutil

    from actcache.format import layout, records

    damaged = tmp_path / Path(extracted_set).name
    shutil.copytree(extracted_set, damaged)
    shard = damaged / layout.shard_file(0, "none")
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert data[8 : 8 + n].count(b'"F16"') == 1
    data = data[: 8 + n].replace(b'"F16"', b'"I16"') + data[8 + n :]  # same length: only the dtype code differs
    shard.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    for rel in (layout.MANIFEST, layout.record_file(0)):  # records that vouch for the edited bytes
        doc = json.loads((damaged / rel).read_text())
        entry = doc["shards"][0] if rel == layout.MANIFEST else doc
        entry["sha256"] = sha
        (damaged / rel).write_text(json.dumps(records.sealed(doc)))
    code = (
        "import sys; from actcache.cli.app import main; rc = main(['verify', sys.argv[1]]); "
        "print('torch imported' if 'torch' in sys.modules else 'no torch', rc)"
    )
    for url, rc, says in ((extracted_set, 0, "OK: 4 shards"), (str(damaged), 1, "header disagrees")):
        p = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=120)
        assert p.stdout.strip().splitlines()[-1] == f"no torch {rc}", p.stdout + p.stderr
        assert says in p.stdout + p.stderr


def test_commands_that_write_take_json(extracted_set, tmp_path, capsys):
    """cp, shuffle and export print one JSON document on stdout with --json (push: tests/actcache/sets)."""
    assert main(["cp", extracted_set, str(tmp_path / "copy"), "--json"]) == 0
    copied = json.loads(capsys.readouterr().out)
    assert copied["url"] == str(tmp_path / "copy" / Path(extracted_set).name) and copied["copied"] == 4
    assert main(["shuffle", copied["url"], "--seed", "2", "--json"]) == 0
    shuffled = json.loads(capsys.readouterr().out)
    assert shuffled["rows"] == 448 and shuffled["shards"] == 4 and not shuffled["skipped"]
    assert main(["export", shuffled["url"], str(tmp_path / "hf"), "--format", "hf", "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported == {"path": str(tmp_path / "hf"), "rows": 448, "excluded_tokens": 0, "dtype": "float16"}


@pytest.mark.subprocess
def test_no_progress_bar_before_an_error(extracted_set, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # bars on (tqdm reads it at import)
    (tmp_path / "taken").mkdir()
    for argv in (
        ["export", extracted_set, str(tmp_path / "taken"), "--format", "hf"],
        ["shuffle", str(tmp_path / ("0" * 24))],
        ["cp", str(tmp_path / ("0" * 24)), str(tmp_path / "copy")],
    ):
        run = subprocess.run(
            [sys.executable, "-m", "actcache.cli", *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert run.returncode == 2
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("actcache: error:"), (argv, run.stderr)


@pytest.mark.subprocess
@pytest.mark.parametrize("command", ["cp", "export", "shuffle"])
def test_the_error_is_the_last_line_of_stderr_after_a_progress_bar(extracted_set, tmp_path, command):
    """A command that fails midway on a terminal: its progress bar is closed before the error line, which is the
    last line (stderr is a pseudo-terminal here, so the bar is drawn as for a user)."""
    import fcntl
    import pty
    import shutil
    import struct
    import termios
    import threading

    store = shutil.copytree(Path(extracted_set).parent, tmp_path / "store")
    url = f"{store}/{Path(extracted_set).name}"
    shard = Path(url) / "shards" / "000002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size and mtime order: found only when the shard is read
    shard.write_bytes(bytes(data))
    argv = {
        "cp": ["cp", url, str(tmp_path / "copy")],
        "export": ["export", url, str(tmp_path / "export"), "--format", "hf"],
        "shuffle": ["shuffle", url, "--out", str(tmp_path / "shuffled")],
    }[command]
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # bars on, as for a user
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 0 columns: an empty bar
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "actcache.cli", *argv], stdout=subprocess.PIPE, stderr=follower, timeout=300, env=env
        )
    finally:
        os.close(follower)
        reader.join(10)
        os.close(leader)
    stderr = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    lines = stderr.strip().split("\n")
    assert re.search(r"\| \d+/\d+ \[", stderr), "a progress bar was drawn: " + stderr
    assert run.returncode != 0 and lines[-1].startswith("actcache: error: ") and "shard 2" in lines[-1], stderr


def test_cp_and_export_count_to_their_totals_off_a_terminal(extracted_set, tmp_path, capsys):
    """Off a terminal (no bar), a command's progress is a line with its total; stats already in the manifest
    read no shard and print no progress."""
    assert main(["cp", extracted_set, str(tmp_path / "copy")]) == 0
    err = capsys.readouterr().err
    assert "cp: 4/4 shards" in err and "\r" not in err, err
    assert main(["export", extracted_set, str(tmp_path / "hf"), "--format", "hf"]) == 0
    err = capsys.readouterr().err
    assert "export: 4/4 shards" in err and "Saving the dataset" not in err, err
    assert main(["stats", extracted_set]) == 0
    assert "stats:" not in capsys.readouterr().err
    for argv, line in (
        (["verify", extracted_set], "verify: 4/4 shards"),
        (["diff", extracted_set, extracted_set], "diff: 4/4"),
    ):
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert line in err and "\r" not in err, err
    # No bar before an error: a set that is not there fails with its one line alone.
    assert main(["verify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("actcache: error: ") and "verify:" not in err and err.count("\n") == 1, err


def test_ls_of_a_set_url_shows_that_set_and_its_layout(extracted_set, capsys):
    assert main(["ls", extracted_set]) == 0
    out, err = capsys.readouterr()
    assert f"{extracted_set} is a set, not a store; its store is {Path(extracted_set).parent}" in err
    header, row = (line.split() for line in out.strip().splitlines())
    assert header[3] == "LAYOUT" and row[0] == Path(extracted_set).name and row[3] == "tokens", out


def test_show_and_verify_of_an_unfinished_set_say_what_it_lacks(extracted_set, tmp_path, capsys):
    import shutil

    url = str(tmp_path / Path(extracted_set).name)
    shutil.copytree(extracted_set, url)
    (Path(url) / "manifest.json").unlink()  # as a run killed before its manifest leaves it
    for command in ("show", "verify"):
        assert main([command, url]) == 2
        err = capsys.readouterr().err
        assert f"{url} is an unfinished set: 4 shard(s) recorded, but no manifest.json yet" in err, err
        assert "rerun the same `actcache extract` to finish it" in err, err


HEAVY = ("torch", "prefect", "transformers", "transformer_lens", "datasets", "numpy", "s3fs", "huggingface_hub")
"""Modules that take seconds to import here (torch alone ~2 s): none is needed to read JSON and hash bytes."""


@pytest.mark.subprocess
def test_commands_that_read_the_manifest_import_nothing_heavy(extracted_set, tmp_path):
    """ls, show, stats (its numbers already in the manifest), verify (hashes and headers), diff of identical sets,
    cp, rm and gc (bytes and listings), --version and every --help read JSON and bytes: no heavy import, so they
    answer in about the time Python takes to start (a fraction of a second; figures in docs/performance.md). One
    process runs them in turn: the first command after which a heavy module is loaded is the one that imports it."""
    import json
    import shutil
    import subprocess
    import sys

    from actcache.sets import stats

    url = str(tmp_path / "store" / Path(extracted_set).name)
    shutil.copytree(extracted_set, url)
    stats.compute(url)  # in the manifest from now on
    store = str(tmp_path / "store")
    commands = ("extract", "hooks", "ls", "show", "verify", "diff", "stats", "cp", "rm", "gc", "shuffle", "export")
    argvs = [
        ["ls", store],
        ["ls", "--json", store],
        ["ls", url],
        ["show", url],
        ["show", "--json", "--shards", url],
        ["stats", url],
        ["stats", "--json", url],
        ["verify", url],
        ["verify", "--json", url],
        ["diff", url, extracted_set],
        ["diff", "--json", url, extracted_set],
        ["cp", url, str(tmp_path / "copy")],
        ["gc", store],
        ["rm", "--yes", str(tmp_path / "copy" / Path(url).name)],
        ["--version"],
        ["--help"],
        *([c, "--help"] for c in (*commands, "push")),
    ]
    code = (
        "import json, sys; from actcache.cli.app import main\n"
        f"for argv in {argvs!r}:\n"
        "    try: rc = main(argv)\n"
        "    except SystemExit as e: rc = e.code or 0\n"
        f"    print(json.dumps([argv, rc, [m for m in {HEAVY!r} if m in sys.modules]]), file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    done = [json.loads(line) for line in p.stderr.splitlines() if line.startswith("[[")]
    assert [argv for argv, _, _ in done] == argvs, (p.stdout[-2000:], p.stderr[-2000:])
    for argv, rc, heavy in done:
        assert (rc, heavy) == (0, []), (argv, rc, heavy, p.stderr[-2000:])


@pytest.mark.subprocess
def test_python_dash_m_actcache_is_the_command(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "actcache", "ls", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0 and "no sets" in (p.stdout + p.stderr).lower(), (p.stdout, p.stderr)


def test_the_summary_links_the_run_on_a_server_that_outlives_the_command(argv, prefect_console, prefect_harness):
    """With PREFECT_API_URL set (the test session's server), the summary links the run in its UI; Prefect's own
    per-task lines stay off the console (the server keeps them; --verbose shows them)."""
    import re

    assert main(argv) == 0
    out, err = prefect_console.readouterr()
    assert re.search(r"\n  run  http://127\.0\.0\.1:\d+/runs/flow-run/[0-9a-f-]{36}\n", err), err
    assert "runs are not kept" not in err and "Task run" not in err and "Finished in state" not in err, err
    assert "4 shards computed, 0 already stored; 512 tokens in 4 shards" in err, err
    url = out.strip().splitlines()[-1]
    assert f"  set  {url}" in err and f"actcache show {url}" in err

    assert main(["--verbose", *_set(argv, "--max-tokens", "640")]) == 0  # one more shard, with Prefect's lines
    err = prefect_console.readouterr().err
    assert "Task run 'extract-000004' - Finished in state Completed" in err, err


def test_verbose_is_offered_only_where_prefect_runs(capsys):
    """--verbose shows Prefect's log lines: only extract runs flows, so only its help offers it."""
    for command in ("ls", "show", "verify", "diff", "cp", "rm", "gc", "stats", "shuffle", "export", "push", "hooks"):
        main([command, "--help"])
        out = capsys.readouterr().out
        assert "--verbose" not in out and "Prefect's log lines" not in out, (command, out)
    main(["extract", "--help"])
    out = capsys.readouterr().out
    assert "--verbose" in out and "Prefect's log lines" in out, out
