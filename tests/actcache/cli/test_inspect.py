"""`ls`, `show`, `verify`: what they say about complete, unfinished and damaged sets, and that the commands that
only read a manifest import nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from actcache.cli.app import main


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
        assert main([command, url]) == 1  # a failure the named rerun finishes, not bad input
        err = capsys.readouterr().err
        assert f"{url} is an unfinished set: 4 shard(s) recorded, but no manifest.json yet" in err, err
        assert "rerun the same `actcache extract` to finish it" in err, err


@pytest.mark.parametrize("damage", ["json", "fifo"])
def test_a_damaged_manifest_is_a_failure_not_bad_input(extracted_set, tmp_path, capsys, damage):
    """A manifest that is not JSON, or not a regular file, said "rerun the same extract" with exit 2 (bad input),
    and `verify` promises exit 1 on any problem: every reader now exits 1 with that one line."""
    import os
    import shutil

    url = str(tmp_path / Path(extracted_set).name)
    shutil.copytree(extracted_set, url)
    path = Path(url) / "manifest.json"
    path.unlink()
    path.write_text('{"x": ') if damage == "json" else os.mkfifo(path)
    for argv in (
        ["show", url],
        ["verify", url],
        ["stats", url],
        ["export", "--format", "hf", url, str(tmp_path / "e")],
    ):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert "is damaged" in err[-1] and "rerun the same `actcache extract`" in err[-1], err


HEAVY = ("torch", "prefect", "transformers", "transformer_lens", "datasets", "numpy", "s3fs", "huggingface_hub")


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


@pytest.mark.parametrize("how", ["lease", "manifest"])
def test_verify_does_not_blame_a_set_a_run_is_writing(extracted_set, tmp_path, capsys, monkeypatch, how):
    """An extension rewrites a set's last shard and record before its manifest: verify then saw the new bytes
    disagree with the manifest it had read, said FAILED and advised --verify-existing (a repair that races the run).
    With a live writer's lease on the set, or a manifest that changed while verifying, it says so and judges
    nothing (exit 1: verify again later); without either the same damage is reported as before."""
    import shutil

    from actcache.format import layout, records
    from actcache.read.reader import ActivationSet
    from actcache.storage import leases
    from actcache.storage.store import Store

    url = str(tmp_path / "store" / Path(extracted_set).name)
    shutil.copytree(extracted_set, url)
    shard = Path(url) / layout.shard_file(3, "none")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # new bytes, same size: what a reader sees mid-extension
    shard.write_bytes(bytes(data))
    store, set_id = Store(str(Path(url).parent)), Path(url).name

    def verify_json() -> dict:
        code = main(["verify", url, "--json"])
        doc = json.loads(capsys.readouterr().out)
        assert code == 1
        return doc

    if how == "lease":
        with leases.hold(store, set_id):
            assert main(["verify", url]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert "is being written by process" in err[-1] and "verify it again once that run has ended" in err[-1]
            assert not any("FAILED" in line or "--verify-existing" in line for line in err), err
            assert verify_json()["in_flux"].endswith(
                "of this host (lease " + store.url_of(leases.leases(store, set_id)[0].rel) + ")"
            )
    else:
        real = ActivationSet.verify

        def extended_meanwhile(self, **kw):
            problems = real(self, **kw)
            m = json.loads((Path(url) / layout.MANIFEST).read_text())
            m["created"] = "2026-12-04T23:59:59Z"  # resealed: a manifest a run wrote, not damage
            (Path(url) / layout.MANIFEST).write_text(
                json.dumps(records.sealed({k: v for k, v in m.items() if k != "seal"}))
            )
            return problems

        monkeypatch.setattr(ActivationSet, "verify", extended_meanwhile)
        assert main(["verify", url]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert "changed while it was verified" in err[-1] and "FAILED" not in "\n".join(err)
        monkeypatch.setattr(ActivationSet, "verify", real)
    assert main(["verify", url]) == 1  # nobody writing, the manifest as read: the damage is named
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("FAILED") and "rerun the same extract" in err[-1], err
    assert any("fails its sha256 checksum" in line for line in err), err
    assert verify_json()["problems"]
