"""Silent bad data (issue 12): damage a real set in every way a probe or bad luck can, then check that nothing
is trusted on an editable field alone and that `verify`'s hint is the command that repairs the set.

Each case damages a copy of one extracted set, reads `actcache verify`'s verdict, runs exactly the rerun the
hint names, and compares the whole store (token cache included) with the undamaged one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from cliargs import extract_argv
from setfiles import local_tree

import actcache
from actcache.cli.app import main
from actcache.config import ExtractConfig
from actcache.errors import ActcacheError
from actcache.format import layout, records

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def config(make_config) -> ExtractConfig:
    return make_config(hook="blocks.1.hook_resid_post,blocks.0.hook_resid_post")


SET_IDS: list[str] = []


@pytest.fixture(scope="module")
def pristine(config, tmp_path_factory) -> Path:
    """Two 4-shard sets (two hooks) and their token cache, extracted once; tests damage copies of the store."""
    root = tmp_path_factory.mktemp("pristine")
    SET_IDS[:] = [url.rsplit("/", 1)[1] for url in actcache.extract(config.replace(store=str(root)))]
    return root


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    dest = tmp_path / "store"
    shutil.copytree(pristine, dest, symlinks=True)
    return dest


def set_dir(store: Path, which: int = 0) -> Path:
    return store / SET_IDS[which]


def tokens_dir(store: Path) -> Path:
    return next((store / layout.TOKENS_ROOT).iterdir())


@contextlib.contextmanager
def same_mtime(*paths: Path):
    """Edit files in place the way bit rot does: their modification times stay as they were."""
    stamps = {p: p.stat().st_mtime_ns for p in paths}
    yield
    for p, ns in stamps.items():
        os.utime(p, ns=(ns, ns))


def edit_json(path: Path, change, *, reseal: bool) -> None:
    """Apply ``change`` to a store JSON file; ``reseal``: recompute its seal too (a forgery the seal cannot see)."""
    obj = json.loads(path.read_text())
    change(obj)
    if reseal:
        obj = records.sealed(obj)
    path.write_text(json.dumps(obj))


def flip(path: Path, at: int = -7) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def verify(url: str, capsys) -> tuple[int, list[str]]:
    code = main(["verify", url])
    return code, capsys.readouterr().err.strip().splitlines()


def rerun_as_hinted(config: ExtractConfig, store: Path, hint: str) -> None:
    """Run exactly what `verify`'s last line says."""
    assert hint.startswith("FAILED: ") and "rerun the same extract" in hint, hint
    actcache.extract(config.replace(store=str(store), verify_existing="--verify-existing" in hint))


def test_a_plain_rerun_repairs_what_verify_says_it_repairs(config, pristine, store, capsys):
    """Wrong-sha records (sealed or not), a shard touched after its record, a truncated shard, a missing record:
    verify names each one and says a plain rerun repairs them; it does, to the byte."""
    s = set_dir(store)
    shard = {i: s / layout.shard_file(i, "none") for i in range(4)}
    record = {i: s / layout.record_file(i) for i in range(4)}
    bogus = "0" * 64
    edit_json(record[0], lambda r: r.update(sha256=bogus), reseal=False)  # its seal no longer matches
    edit_json(record[1], lambda r: r.update(sha256=bogus), reseal=True)  # sealed, but disagrees with the manifest
    flip(shard[2])
    later = record[2].stat().st_mtime_ns + 10**9
    os.utime(shard[2], ns=(later, later))  # touched after its record
    shard[3].write_bytes(shard[3].read_bytes()[:-1])
    code, err = verify(str(s), capsys)
    assert code == 1 and "--verify-existing" not in err[-1], err
    for i, what in ((0, "completion record"), (1, "disagrees with manifest.json"), (2, "checksum"), (3, "bytes")):
        assert any(f"shard {i}: " in line and what in line for line in err), (i, what, err)

    rerun_as_hinted(config, store, err[-1])
    assert local_tree(store) == local_tree(pristine)
    assert verify(str(s), capsys)[0] == 0


def test_rot_that_leaves_no_trace_needs_verify_existing_and_verify_says_so(config, pristine, store, capsys):
    """Bit rot in a shard and in a token shard with their mtimes kept, and a record and manifest entry forged in
    agreement (seals recomputed, mtimes kept): only hashing sees them. verify does, and says --verify-existing."""
    s, t = set_dir(store), tokens_dir(store)
    with same_mtime(s / layout.shard_file(1, "none")):
        flip(s / layout.shard_file(1, "none"))
    with same_mtime(t / layout.shard_file(2, "none")):
        flip(t / layout.shard_file(2, "none"))
    bogus = "f" * 64
    with same_mtime(s / layout.record_file(3), s / layout.MANIFEST):
        edit_json(s / layout.record_file(3), lambda r: r.update(sha256=bogus), reseal=True)
        edit_json(s / layout.MANIFEST, lambda m: m["shards"][3].update(sha256=bogus), reseal=True)
    code, err = verify(str(s), capsys)
    assert code == 1 and "--verify-existing" in err[-1], err
    assert any("shard 1:" in line and "checksum" in line for line in err)
    assert any("token shard 2" in line for line in err)
    assert any("shard 3:" in line and "checksum" in line for line in err)

    actcache.extract(config.replace(store=str(store)))  # a plain rerun trusts sizes and mtimes: as verify said,
    assert verify(str(s), capsys)[0] == 1  # the damage stays
    rerun_as_hinted(config, store, err[-1])
    assert local_tree(store) == local_tree(pristine)
    assert verify(str(s), capsys)[0] == 0


def test_a_rotten_token_shard_never_feeds_a_new_shard(config, pristine, store):
    """A token shard rotted in place (mtime kept) under an activation shard still to compute: the plain rerun
    re-hashes the token shards it feeds to the model, rebuilds the damaged one, and computes the right shard."""
    s, t = set_dir(store), tokens_dir(store)
    (s / layout.shard_file(2, "none")).unlink()
    with same_mtime(t / layout.shard_file(2, "none")):
        flip(t / layout.shard_file(2, "none"), at=-3)  # a token id changes: still a valid safetensors file
    actcache.extract(config.replace(store=str(store)))
    assert local_tree(store) == local_tree(pristine)


def _manifest_damage():
    def replace_with(text):
        return lambda p: p.write_text(text)

    def edited(change, reseal):
        return lambda p: edit_json(p, change, reseal=reseal)

    def linked(target):
        def make(p):
            p.unlink()
            p.symlink_to(target)

        return make

    def fifo(p):
        p.unlink()
        os.mkfifo(p)

    deep = "[" * 100_000 + "]" * 100_000
    return {
        "not an object": replace_with("[]"),
        "a string": replace_with('"manifest"'),
        "nested 100000 deep": replace_with(deep),
        "nested 40 deep in a field": edited(lambda m: m.update(model=json.loads("[" * 40 + "]" * 40)), True),
        "truncated JSON": lambda p: p.write_bytes(p.read_bytes()[:100]),
        "not UTF-8": lambda p: p.write_bytes(b"\xff\xfe" + p.read_bytes()),
        "Infinity in it": replace_with('{"format_version": Infinity}'),
        "entry sha edited": edited(lambda m: m["shards"][1].update(sha256="0" * 64), False),
        "entry listed twice (resealed)": edited(lambda m: m["shards"].append(m["shards"][0]), True),
        "n_seq beyond the key (resealed)": edited(
            lambda m: m["shards"][0].update(n_seq=10**6, n_tokens=32 * 10**6), True
        ),
        "totals edited (resealed)": edited(lambda m: m.update(n_tokens=10**12), True),
        "hook_shape edited (resealed)": edited(lambda m: m.update(hook_shape=[64]), True),
        "dtype edited (resealed)": edited(lambda m: m.update(dtype="float32"), True),
        "file of another shard (resealed)": edited(lambda m: m["shards"][0].update(file=m["shards"][1]["file"]), True),
        "a symlink to /dev/zero": linked("/dev/zero"),
        "a symlink to another file": linked("../" + layout.TOKENS_ROOT),
        "a FIFO": fifo,
    }


MANIFEST_DAMAGE = _manifest_damage()


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_damaged_manifest_is_one_line_everywhere_and_a_rerun_rebuilds_it(config, pristine, store, capsys, damage):
    """show/verify/open_set refuse it in one line (no hang on a FIFO, no memory on /dev/zero, no RecursionError),
    ls reports the set as damaged and goes on with the others, and a plain rerun rebuilds it from the records."""
    import resource

    s = set_dir(store)
    MANIFEST_DAMAGE[damage](s / layout.MANIFEST)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for argv in (["show", str(s)], ["verify", str(s)]):
        assert main(argv) == 1, (damage, argv)  # damage a rerun repairs: a failure
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("actcache: error: manifest of "), (damage, err)
        assert "rerun" in err[0] or "regenerate" in err[0] or "not an actcache set" in err[0], err
    with pytest.raises(ActcacheError):
        actcache.open_set(str(s))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 << 10  # KB: nothing near a GB

    assert main(["ls", str(store)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "damaged" in rows[s.name] and "complete" in rows[SET_IDS[1]], rows  # the other set is still listed

    actcache.extract(config.replace(store=str(store)))
    assert local_tree(store) == local_tree(pristine)


def test_reading_fields_forged_in_agreement_are_caught_by_the_key_when_it_gives_the_width(
    config, pristine, store, capsys
):
    """d and hook_shape edited consistently (manifest resealed), the model's config kept: the key's width (from the
    config its fingerprint vouches for) refuses the manifest in one line when the set is opened, and the rerun that
    line names rebuilds the manifest from the records."""
    s = set_dir(store)
    edit_json(s / layout.MANIFEST, lambda m: m.update(d=1 << 30, hook_shape=[1 << 30]), reseal=True)
    for argv in (["show", str(s)], ["verify", str(s)]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "wider than a true shard of its key" in err[0] and "rerun" in err[0], err
    with pytest.raises(ActcacheError, match="wider than a true shard of its key"):
        actcache.open_set(str(s))
    actcache.extract(config.replace(store=str(store)))
    assert local_tree(store) == local_tree(pristine)


def test_reading_fields_forged_in_agreement_are_caught_by_the_shards_own_header(config, pristine, store, capsys):
    """d and hook_shape edited consistently and the model's config dropped (manifest resealed): the manifest alone
    looks sound and the key gives no width, but verify checks every shard's safetensors header against it, reading
    refuses before allocating what the edit says, and the rerun verify names (--verify-existing) rebuilds the
    manifest from the records."""
    import resource

    def forge(m):
        m.update(d=1 << 30, hook_shape=[1 << 30])
        assert m.pop("model_config", None) is not None  # what makes the key give a width

    s = set_dir(store)
    edit_json(s / layout.MANIFEST, forge, reseal=True)
    code, err = verify(str(s), capsys)
    assert code == 1 and "--verify-existing" in err[-1], err
    assert sum("header" in line for line in err) == 4, err
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    opened = actcache.open_set(str(s))
    with pytest.raises(ActcacheError, match=r"shard 0 of .* unreadable .*expected torch.float16\[4, 32, 1073741824\]"):
        opened.read(opened.records[0])
    with pytest.raises(ActcacheError, match="is unreadable"):
        next(iter(actcache.ActivationDataset(str(s), 16)))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 << 10  # KB: not the 8 GB the edit says
    rerun_as_hinted(config, store, err[-1])
    assert local_tree(store) == local_tree(pristine)


def test_every_json_file_the_store_holds_is_strict_and_sealed(pristine):
    """No NaN/Infinity anywhere (strict parsers reject them), and every record, manifest and index is sealed."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    files = [p for p in pristine.rglob("*.json")]
    assert len(files) >= 4 + 4 + 3
    for p in files:
        obj = json.loads(p.read_text(), parse_constant=refuse)
        records.check_sealed(obj, str(p))
        assert records.SEAL in obj, p


def test_records_hash_the_bytes_they_name(pristine):
    """The records are what the reference says: sha256 and size of each shard's stored bytes."""
    s = set_dir(pristine)
    for i in range(4):
        rec = json.loads((s / layout.record_file(i)).read_text())
        data = (s / rec["file"]).read_bytes()
        assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["bytes"] == len(data)


# -- non-finite activations ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loud_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny GPT-2 with its token embeddings scaled (so blocks.0.hook_resid_pre is huge) or partly NaN."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    out = {}
    for name, change in (
        ("x1e7", lambda w: w.mul_(1e7)),
        ("x1e21", lambda w: w.mul_(1e21)),
        ("nan", lambda w: w[::7].fill_(float("nan"))),
    ):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
        with torch.no_grad():
            change(model.transformer.wte.weight)
        path = tmp_path_factory.mktemp(f"model-{name}")
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


def _strict(path: Path):
    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize(
    "model,dtype,hint", [("x1e7", "float16", "--dtype bfloat16"), ("nan", "float16", "the model itself produced them")]
)
def test_non_finite_activations_are_warned_about_and_reported_everywhere(
    loud_models, corpus, tmp_path, prefect_console, model, dtype, hint
):
    store = tmp_path / "store"
    argv = extract_argv(loud_models[model], corpus, store, hook="blocks.0.hook_resid_pre", max_tokens=256, dtype=dtype)
    assert main(argv) == 0
    out, err = prefect_console.readouterr()
    url = out.strip().splitlines()[-1]
    assert any("WARNING" in line and "shard 0" in line and hint in line for line in err.splitlines()), err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"actcache: warning: {url}: ") and hint in err.splitlines()[-1]
    m = _strict(Path(url) / layout.MANIFEST)
    nf = m["non_finite"]
    assert (nf["inf"] + nf["nan"]) > 0 and nf["shards"] == 2
    assert nf["nan" if model == "nan" else "inf"] > 0

    assert main(["ls", str(store)]) == 0
    row = prefect_console.readouterr().out.splitlines()[1]
    inf, nan = map(int, re.search(r"(\d+) inf, (\d+) nan", row).groups())
    assert (nan if model == "nan" else inf) > 0, row
    assert main(["show", url, "--json"]) == 0
    shown, err = prefect_console.readouterr()
    assert json.loads(shown)["non_finite"]["shards"] == 2 and hint in err
    assert main(["verify", url]) == 0
    out, err = prefect_console.readouterr()
    assert out.startswith("OK: ") and hint in err

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from actcache.tasks.manifest import artifact_key

    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key("extraction", Path(url).name)])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    rows = json.loads(art.data) if isinstance(art.data, str) else art.data
    assert rows[0]["inf"] + rows[0]["nan"] > 0, rows  # the run's summary table


def test_float32_norms_that_overflow_stay_finite_json(loud_models, corpus, tmp_path, prefect_console):
    """Values near 1e19 are finite in float32 but their squares are not: the stored norm must stay a number."""
    store = tmp_path / "store"
    hook = "blocks.0.hook_resid_pre"
    argv = extract_argv(loud_models["x1e21"], corpus, store, hook=hook, max_tokens=256, dtype="float32")
    assert main(argv) == 0
    url = prefect_console.readouterr().out.strip().splitlines()[-1]
    for p in store.rglob("*.json"):
        _strict(p)
    m = _strict(Path(url) / layout.MANIFEST)
    norms = [r["extra"]["stats"]["mean_l2_norm"] for r in m["shards"]]
    assert all(isinstance(n, float) and 1e18 < n < 1e30 for n in norms), norms
    assert m["non_finite"] == {"nan": 0, "inf": 0, "shards": 0, "source_finite": True}


def _adopt_sibling(store: Path, i: int, copy=shutil.copy2) -> None:
    """Copy shard ``i`` and its record from the other hook's set (same shape) over set 0's, as a careless hand or
    a bad sync would: their checksums and seals are right, their set id (record, shard metadata) is not."""
    s, sibling = set_dir(store, 0), set_dir(store, 1)
    for rel in (layout.shard_file(i, "none"), layout.record_file(i)):
        copy(sibling / rel, s / rel)


def test_a_shard_and_record_copied_from_a_sibling_set_are_damage_and_a_rerun_repairs_them(
    config, pristine, store, capsys
):
    """The sibling's shard 1 and record 1 copied in: verify names them; the rerun it recommends recomputes them,
    with Prefect (the flow) or without (the flow's stages called in order); the store is then the pristine one.
    Copied as ``cp`` does, the record is newer than the manifest and a plain rerun reads it; copied with its
    times kept, only --verify-existing reads it, and verify says so."""
    from setwriter import extract_by_stages

    for rerun, copy, hint in (("flow", shutil.copy, False), ("stages", shutil.copy2, True)):
        _adopt_sibling(store, 1, copy)
        code, err = verify(str(set_dir(store)), capsys)
        assert code == 1 and any("shard 1: " in line and "belongs to set" in line for line in err), err
        assert ("--verify-existing" in err[-1]) == hint, err
        if rerun == "flow":
            rerun_as_hinted(config, store, err[-1])
        else:
            extract_by_stages(config.replace(store=str(store), verify_existing=hint))
        assert local_tree(store) == local_tree(pristine), rerun
        assert verify(str(set_dir(store)), capsys)[0] == 0


def test_a_sibling_shard_under_a_forged_record_and_manifest_is_damage(config, pristine, store, capsys):
    """What an earlier repair could leave: the sibling's shard, its record re-labelled as this set's and the
    manifest entry agreeing (both resealed, mtimes kept). Only the shard's own metadata tells; verify reads it and
    says --verify-existing, which recomputes the shard."""
    s = set_dir(store)
    with same_mtime(s / layout.shard_file(1, "none"), s / layout.record_file(1), s / layout.MANIFEST):
        _adopt_sibling(store, 1)
        foreign = json.loads((s / layout.record_file(1)).read_text())
        edit_json(s / layout.record_file(1), lambda r: r["extra"].update(set_id=SET_IDS[0]), reseal=True)
        mine = json.loads((s / layout.record_file(1)).read_text())
        entry = {k: v for k, v in mine.items() if k != records.SEAL}
        edit_json(s / layout.MANIFEST, lambda m: m["shards"].__setitem__(1, entry), reseal=True)
    assert foreign["extra"]["set_id"] == SET_IDS[1]
    code, err = verify(str(s), capsys)
    assert code == 1 and any("shard 1: " in line and f"names set_id '{SET_IDS[1]}'" in line for line in err), err
    assert "--verify-existing" in err[-1], err
    rerun_as_hinted(config, store, err[-1])
    assert local_tree(store) == local_tree(pristine)
    assert verify(str(s), capsys)[0] == 0
