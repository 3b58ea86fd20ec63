"""Issue 22: a set that a run left below its target (a lost fan-out parent, a partition alone) is called
`incomplete (interrupted run)` by ls, show and verify, with the command that finishes it, and that command does."""

from __future__ import annotations

import json

import pytest

from actcache.cli import app as cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_an_interrupted_set_is_named_so_with_the_command_that_finishes_it(tmp_path, capsys, make_config):
    from actcache.flows.extract import extract_activations

    store = str(tmp_path / "store")
    cfg = make_config(store=store)
    [url] = extract_activations(cfg, partition_index=0, num_partitions=2)  # its parent never consolidated
    finish = f"actcache extract --like {url} --store {store}"
    capsys.readouterr()

    assert cli.main(["ls", "--json", store]) == 0
    [entry] = json.loads(capsys.readouterr().out)["sets"]
    assert entry["state"] == "incomplete" and entry["n_tokens"] == 256
    assert entry["detail"] == f"interrupted run: 256 of 512 tokens stored; finish it with `{finish}`"
    assert cli.main(["ls", store]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1].endswith("incomplete (interrupted run)") and finish in err
    assert "partial" not in out + err  # "raise --max-tokens" would be the wrong advice
    assert cli.main(["show", url]) == 0
    assert (
        f"incomplete (interrupted run: 256 of 512 tokens stored; finish it with `{finish}`)" in capsys.readouterr().out
    )
    assert cli.main(["verify", url]) == 1
    err = capsys.readouterr().err
    assert f"run `{finish}` to finish" in err and "2 of 4 shards missing" in err

    assert cli.main(finish.split()[1:]) == 0  # the command, as printed
    capsys.readouterr()
    assert cli.main(["ls", "--json", store]) == 0
    [entry] = json.loads(capsys.readouterr().out)["sets"]
    assert (entry["state"], entry["n_tokens"], entry["detail"]) == ("complete", 512, None)
    assert cli.main(["verify", url]) == 0
