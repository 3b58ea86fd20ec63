"""``extract --like SET``: reproduce a set elsewhere (byte for byte, here into S3), extend it, or refuse when the
inputs it names have changed."""

from __future__ import annotations

import json
import shutil

import pytest
from setfiles import local_tree, normalized

from actcache.cli.app import main
from actcache.sets import reproduce

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def original(make_config, corpus, prefect_harness, tmp_path_factory) -> dict:
    """A set whose every byte-changing setting differs from the defaults, from a corpus of its own."""
    from actcache.api import extract

    root = tmp_path_factory.mktemp("like")
    shutil.copy(corpus, root / "corpus.txt")
    store = root / "store"
    cfg = make_config(
        arch="llama",
        hook="blocks.2.hook_resid_pre",
        dataset=str(root / "corpus.txt"),
        context_size=16,
        prepend_bos=False,
        separator="none",
        max_tokens=192,
        shard_tokens=64,
        dtype="bfloat16",
        codec="shuffle-zstd",
        codec_level=5,
        store=str(store),
        batch_size=0,
    )
    return {"url": extract(cfg), "store": store, "corpus": root / "corpus.txt"}


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_reproduces_into_s3_byte_for_byte(original, s3_server, s3_env, capsys):
    url = s3_server.new_prefix()
    code, out, err = run(capsys, "extract", "--like", original["url"], "--store", url, "--json")
    assert code == 0, err
    (s,) = json.loads(out)["sets"]
    assert s["set_id"] == original["url"].rsplit("/", 1)[1] and s["shards_computed"] == 3 and s["complete"]
    assert normalized(s3_server.keys_under(url)) == local_tree(original["store"])


def test_extends_and_overrides(original, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(original["store"], store)
    set_id = original["url"].rsplit("/", 1)[1]
    code, out, err = run(
        capsys, "extract", "--like", original["url"], "--store", str(store), "--max-tokens", "320", "--json"
    )
    (s,) = json.loads(out)["sets"]
    assert code == 0 and s["set_id"] == set_id, err
    assert (s["shards_skipped"], s["shards_computed"], s["n_tokens"]) == (3, 2, 320)

    code, out, _ = run(
        capsys, "extract", "--like", original["url"], "--store", str(store), "--dtype", "float16", "--json"
    )
    (other,) = json.loads(out)["sets"]
    assert code == 0 and other["set_id"] != set_id and other["n_tokens"] == 192
    m = json.loads((store / other["set_id"] / "manifest.json").read_text())
    assert (m["dtype"], m["codec"], m["codec_level"], m["hook"]) == (
        "float16",
        "shuffle-zstd",
        5,
        "blocks.2.hook_resid_pre",
    )


def test_refuses_when_the_inputs_changed(original, tmp_path, capsys):
    text = original["corpus"].read_text()
    try:
        original["corpus"].write_text(text.replace("the", "THE", 1))
        code, _, err = run(capsys, "extract", "--like", original["url"], "--store", str(tmp_path / "s"))
    finally:
        original["corpus"].write_text(text)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "would not reproduce it (the dataset's fingerprint differs" in lines[0]
    assert not (tmp_path / "s").exists()


def test_settings_of_a_hub_set_pin_its_revisions():
    m = {
        "set_id": "x",
        "hook": "blocks.6.hook_resid_post",
        "shard_tokens": 8192,
        "target_tokens": 65536,
        "dtype": "float16",
        "model_dtype": "float32",
        "codec": "none",
        "codec_level": 0,
        "model": {"name": "gpt2", "revision": "607a30d783dfa663caf39e06633721c8d4cfcd7e", "trust_remote_code": False},
        "dataset": {
            "path": "NeelNanda/pile-10k",
            "config": None,
            "split": "train",
            "text_column": "text",
            "revision": "127bfedcd5047750df5ccf3a12979a47bfa0bafa",
        },
        "tokenization": {"separator": "eos"},
        "key": {"tokens": {"context_size": 128, "prepend_bos": True}},
    }
    s = reproduce.settings(m)
    assert s["revision"] == m["model"]["revision"] and s["dataset_revision"] == m["dataset"]["revision"]
    assert s["max_tokens"] == 65536 and s["shard_tokens"] == 8192 and "codec_level" not in s
    flags = {"store": "./x", "max_tokens": 1, "dtype": "bfloat16", "batch_size": 4}
    merged = reproduce.merge(m, flags, frozenset({"dtype"}))
    assert (merged["dtype"], merged["max_tokens"], merged["store"], merged["batch_size"]) == (
        "bfloat16",
        65536,
        "./x",
        4,
    )


def test_the_python_api_takes_like_as_the_cli_does(original, tmp_path, capsys):
    """``actcache.extract(like=URL, **overrides)``: the same set byte for byte, an override extends it, and an
    input that changed is refused before anything is written, as ``extract --like`` does."""
    import actcache

    url = actcache.extract(like=original["url"], store=str(tmp_path / "api"))
    assert url.rsplit("/", 1)[1] == original["url"].rsplit("/", 1)[1]
    assert local_tree(tmp_path / "api") == local_tree(original["store"])

    code, out, err = run(
        capsys, "extract", "--like", original["url"], "--store", str(tmp_path / "cli"), "--max-tokens", "320"
    )
    assert code == 0, err
    longer = actcache.extract(actcache.ExtractConfig(store=str(tmp_path / "api")), like=original["url"], max_tokens=320)
    assert longer == url and actcache.open_set(longer).n_tokens == 320
    assert local_tree(tmp_path / "api") == local_tree(tmp_path / "cli")

    text = original["corpus"].read_text()
    try:
        original["corpus"].write_text(text.replace("the", "THE", 1))
        with pytest.raises(actcache.ActcacheError, match=r"would not reproduce it \(the dataset's fingerprint differs"):
            actcache.extract(like=original["url"], store=str(tmp_path / "refused"))
    finally:
        original["corpus"].write_text(text)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(TypeError, match="nope"):
        actcache.extract(like=original["url"], nope=1)


def test_an_example_set_with_a_selection_is_reproduced(tiny_models, tmp_path, capsys):
    """--packing, --truncate, --positions, --keep-columns, --heads and --dims are part of the key: --like carries
    them, so the reproduction is the same set, byte for byte (it was refused as another set before)."""
    import json

    from setfiles import local_tree

    from actcache.config import ExtractConfig
    from actcache.extraction import examples
    from actcache.extraction.plan import make_plan
    from actcache.inputs import demo

    data = tmp_path / "rows.jsonl"
    lines = demo.corpus_lines()[:10]
    data.write_text("\n".join(json.dumps({"text": x, "label": i % 2}) for i, x in enumerate(lines)) + "\n")
    cfg = ExtractConfig(
        model=str(tiny_models["gpt2"]),
        dataset=str(data),
        store=str(tmp_path / "a"),
        device="cpu",
        hook="blocks.1.attn.hook_z",
        context_size=16,
        max_tokens=1 << 10,
        shard_tokens=4 * 16,
        packing="none",
        truncate="left",
        positions="0,-1",
        keep_columns="label",
        heads="1",
        dims="0:4",
    )
    (url,) = examples.extract(make_plan(cfg))
    code, out, err = run(capsys, "extract", "--like", url, "--store", str(tmp_path / "b"), "--device", "cpu")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(tmp_path / "b" / url.rsplit("/", 1)[1])
    set_id = url.rsplit("/", 1)[1]
    assert local_tree(tmp_path / "b" / set_id) == local_tree(tmp_path / "a" / set_id)
