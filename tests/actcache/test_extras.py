"""Without the extraction extra (TransformerLens, transformers, Prefect), every command that reads, checks or
rewrites sets works and imports none of them; `extract` and `hooks` say in one line which extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import setwriter

pytestmark = pytest.mark.subprocess  # every test runs the CLI in a Python that cannot import the extra

# Runs the CLI as if the extra were not installed: importing (or finding) its modules fails.
WITHOUT_EXTRA = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys
    BLOCKED = ("prefect", "prefect_aws", "transformer_lens", "transformers", "tokenizers")

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Missing())
    find = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in BLOCKED else find(name, *a)
    from actcache.cli import main

    code = main(sys.argv[1:])
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
    assert not loaded, f"imported {loaded}"
    sys.exit(code)
    """
)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTRA, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def a_set(tmp_path_factory):
    return setwriter.write_set(tmp_path_factory.mktemp("no-extra"), shards=3, seqs=2, ctx=8, d=4)


def test_reading_commands_need_no_extra(a_set, tmp_path):
    store = a_set.rsplit("/", 1)[0]
    for args in (
        ["ls", store],
        ["show", a_set],
        ["verify", a_set],
        ["stats", a_set],
        ["shuffle", a_set, "--out", str(tmp_path / "shuffled")],
        ["export", a_set, str(tmp_path / "hf"), "--format", "hf"],
        ["cp", a_set, str(tmp_path / "copy")],
    ):
        run = cli(*args)
        assert run.returncode == 0, (args, run.stderr)


@pytest.mark.parametrize("command", [["extract", "--max-tokens", "64"], ["hooks", "gpt2"]])
def test_extraction_without_the_extra_names_it_in_one_line(command):
    run = cli(*command)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1
    assert "needs actcache's extraction extra" in run.stderr and "pip install 'actcache[extract]'" in run.stderr
