"""README's and docs/*.md's shell blocks (fences with no language) run as pasted after `make demo`, or say why not.

The rules, one each:

- A *command* is a line of a shell block that starts (at the block's indentation) with ``actcache `` or
  ``.venv/bin/actcache ``, its ``\\`` continuations joined and a trailing ``# comment`` dropped; ``a; actcache b``
  is two commands. Every other line (``export``, comments, output) is not run.
- A command is a *template*, and is skipped, when one of its words is a placeholder: a word in capitals
  (``MODEL``, ``SET_A``, ``REPO_ID``, ``M``), or a word holding ``[``, ``|``, ``...`` or an unsubstituted ``<name>``.
- Every other command runs in-process (``actcache.cli.app.main``, words split by shlex) after the substitutions of
  ``SHELL_SUBSTITUTE`` in tests/test_readme.py (the one place: offline fixtures for the hub, S3 and the demo's set),
  in a fresh working folder, and must exit 0, or N when its comment starts ``# exit N``. ``<set_id>`` names the set
  that the block's last ``extract`` printed (whose manifest must open); before any, the shared test set. An
  ``extract --json`` whose comment says it ``reuses`` must report every set reused.
- A block with no command to run (an install, a server, a listing, output, a reference card of templates) carries
  ``<!-- no-run: why -->`` on the line before its fence; a block that carries it runs nothing.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from test_readme import PAGES, ROOT, SHELL_SUBSTITUTE

FENCE = re.compile(r"^([ \t]*)```([\w+-]*)[ \t]*$")
COMMAND = re.compile(r"^(?:\.venv/bin/)?actcache ")
PLACEHOLDER = re.compile(r"^-*[A-Z][A-Z0-9_]*(?:=.*)?$|[\[|]|\.\.\.|<[\w-]+>")


def _shell_blocks() -> list[tuple[str, int, str, str]]:
    """Every fence with no language: (page, line of the fence, the marker line before it or "", the body)."""
    out = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            indent, lang = m.groups()
            end = next(j for j in range(i + 1, len(lines)) if FENCE.match(lines[j]) and not FENCE.match(lines[j])[2])
            if not lang:
                marker = lines[i - 1].strip() if i and lines[i - 1].strip().startswith("<!--") else ""
                body = "\n".join(line.removeprefix(indent) for line in lines[i + 1 : end])
                out.append((str(page.relative_to(ROOT)), i + 1, marker, body))
            i = end + 1
    return out


def _commands(body: str) -> list[tuple[str, int, str]]:
    """The block's commands (see the module's rules): each with the exit code it must give and its comment."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", body).splitlines():
        if not COMMAND.match(line):
            continue
        words = shlex.split(line, comments=True)
        comment = line.split(" #", 1)[1].strip() if " #" in line else ""
        code = re.match(r"exit (\d+)\b", comment)
        argv: list[str] = []
        for word in [*words, ";"]:
            if word.endswith(";") and word != ";":
                argv.append(word[:-1])
                word = ";"
            if word == ";":
                if argv:
                    out.append((shlex.join(argv), int(code[1]) if code else 0, comment))
                argv = []
            else:
                argv.append(word)
    return out


def _is_template(command: str) -> bool:
    for text in SHELL_SUBSTITUTE:
        command = command.replace(text, "x")
    return any(PLACEHOLDER.search(word) for word in shlex.split(command))


def _runnable(body: str) -> list[tuple[str, int, str]]:
    return [command for command in _commands(body) if not _is_template(command[0])]


BLOCKS = _shell_blocks()
RUN = [(page, line, body) for page, line, marker, body in BLOCKS if "no-run:" not in marker]


def test_every_shell_block_is_run_or_says_why():
    assert len(BLOCKS) >= 20, "the fence rule finds the docs' shell blocks"
    for page, line, marker, body in BLOCKS:
        runnable = _runnable(body)
        if "no-run:" in marker:
            assert marker.endswith("-->") and len(marker) > len("<!-- no-run: -->") + 3, (page, line, marker)
            assert not runnable, f"{page}:{line} says no-run but has commands to run: {runnable}"
        else:
            assert runnable, f"{page}:{line}: a shell block with no command to run needs <!-- no-run: why -->"


def test_the_rules_recognise_templates_and_commands():
    body = "actcache show SET   # a summary\nactcache verify ./activations/<set_id>  # exit 1 here\n"
    body += (
        "actcache extract --model gpt2 \\\n    --hook blocks.6.hook_resid_post\nactcache --version; actcache --help\n"
    )
    body += "  actcache ls out   # output, indented\nactcache export SET [SET ...] OUT --format saelens|hf\n"
    commands = _commands(body)
    assert [c for c, _, _ in commands][2:5] == [
        "actcache extract --model gpt2 --hook blocks.6.hook_resid_post",
        "actcache --version",
        "actcache --help",
    ]
    assert commands[1] == ("actcache verify './activations/<set_id>'", 1, "exit 1 here")
    assert _runnable(body) == commands[1:5]


@pytest.fixture
def block_folder(tmp_path, tiny_models, monkeypatch) -> Path:
    """The working folder a block runs in, holding the data files the docs name (statements.jsonl, with label and
    source columns; pretokenized.jsonl, their token ids by the tiny GPT-2's tokenizer in input_ids, row for row;
    pretokenized.parquet, more token ids in input_ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from actcache.inputs import demo

    monkeypatch.chdir(tmp_path)
    lines = [" ".join(line.split()[:20]) for line in demo.corpus_lines()[:40]]
    rows = [{"text": t, "label": i % 2, "source": "demo"} for i, t in enumerate(lines)]
    (tmp_path / "statements.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    pretokenized = [json.dumps({"input_ids": ids}) for ids in tokenizer(lines)["input_ids"]]
    (tmp_path / "pretokenized.jsonl").write_text("\n".join(pretokenized))
    ids = tokenizer(demo.corpus_lines()[:200])["input_ids"]
    pq.write_table(pa.table({"input_ids": ids}), tmp_path / "pretokenized.parquet")
    return tmp_path


@pytest.mark.parametrize("page,line,body", RUN, ids=[f"{p}:{n}" for p, n, _ in RUN])
def test_shell_blocks_run_as_pasted(
    page, line, body, block_folder, extracted_set, tiny_models, corpus, s3_server, s3_env, prefect_harness, capsys
):
    from actcache.cli.app import main

    fields = {
        "set": extracted_set,
        "store": block_folder / "activations",
        "gpt2": tiny_models["gpt2"],
        "corpus": corpus,
        "s3": s3_server.new_prefix(),
    }
    import actcache

    printed = None  # the set id the block's last extract printed
    for command, code, comment in _runnable(body):
        if printed:
            command = command.replace("<set_id>", printed)
        for text, fixture in SHELL_SUBSTITUTE.items():
            command = command.replace(text, fixture.format(**fields))
        argv = shlex.split(command)[1:]
        got = main(argv)
        out, err = capsys.readouterr()
        assert got == code, f"{page}:{line}: `{command}` exited {got}, not {code}:\n{err[-2000:]}"
        if argv[0] == "extract" and code == 0:
            url = json.loads(out)["sets"][-1]["url"] if "--json" in argv else out.split()[-1]
            if "reuses" in comment:
                assert all(s["reused"] for s in json.loads(out)["sets"]), (command, out)
            assert actcache.open_set(url).n_tokens > 0, (command, out)
            printed = url.rstrip("/").rsplit("/", 1)[-1]
