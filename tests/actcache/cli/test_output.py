"""The `--json` documents every command prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cliargs import extract_argv

from actcache.cli.app import main


@pytest.fixture(scope="module")
def made(tiny_models, corpus, prefect_harness, tmp_path_factory) -> dict:
    """One two-hook extraction through the CLI with --json (its output, for the tests below)."""
    store = tmp_path_factory.mktemp("json") / "store"
    hooks = "blocks.0.hook_resid_post,blocks.1.hook_resid_post"
    argv = [*extract_argv(tiny_models["gpt2"], corpus, store, hook=hooks, max_tokens=384), "--json"]
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
