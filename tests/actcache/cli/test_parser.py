"""The parser: one version, and help that renders every choice, default and exit code."""

from __future__ import annotations

import re

from actcache.cli.app import main


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


def test_verbose_is_offered_only_where_prefect_runs(capsys):
    """--verbose shows Prefect's log lines: only extract runs flows, so only its help offers it."""
    for command in ("ls", "show", "verify", "diff", "cp", "rm", "gc", "stats", "shuffle", "export", "push", "hooks"):
        main([command, "--help"])
        out = capsys.readouterr().out
        assert "--verbose" not in out and "Prefect's log lines" not in out, (command, out)
    main(["extract", "--help"])
    out = capsys.readouterr().out
    assert "--verbose" in out and "Prefect's log lines" in out, out


def test_verbose_is_refused_in_one_line_by_every_other_command(capsys, tmp_path):
    """--verbose means one thing (Prefect's log lines, on extract): elsewhere it is refused, exit 2, before any work."""
    store = tmp_path / "store"
    for argv in (
        ["ls", str(store), "--verbose"],
        ["--verbose", "show", str(store / "x")],
        ["verify", "--verbose", str(store / "x")],
        ["gc", str(store), "--yes", "--verbose"],
        ["hooks", "builtin:tiny-gpt2", "--verbose"],
        ["stats", "--verbose", "--help"],
    ):
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        command = next(a for a in argv if not a.startswith("-"))
        assert out == "" and err.count("\n") == 1, (argv, out, err)
        assert err == (
            f"actcache: error: --verbose is taken only by `actcache extract` (it shows Prefect's log lines); "
            f"{command} runs no Prefect flow\n"
        ), argv
    assert not store.exists()
    # where it is taken, or where no command runs, it is not refused
    assert main(["--verbose", "extract", "--help"]) == 0
    assert "--verbose" in capsys.readouterr().out
    assert main(["--verbose", "--version"]) == 0
    capsys.readouterr()


# -- repeated options and extra arguments ---------------------------------------------------------------------
def test_a_repeated_list_option_joins_its_values():
    """Researchers repeat --hook (as most CLIs take lists): its values join, as --hook a,b."""
    from actcache.cli.app import _joined_lists

    argv = ["extract", "--hook", "a", "--max-tokens", "8", "--hook=b,c", "--keep-columns", "x", "--hook", "d"]
    assert _joined_lists(argv) == ["extract", "--hook=a,b,c,d", "--max-tokens", "8", "--keep-columns=x"]
    assert _joined_lists(["extract", "--", "--hook", "a", "--hook", "b"]) == [
        "extract",
        "--",
        "--hook",
        "a",
        "--hook",
        "b",
    ]
    assert _joined_lists(["extract", "--hook"]) == ["extract", "--hook"]  # no value: cyclopts says so


def test_other_repeats_and_extra_arguments_are_one_line_each(capsys):
    assert main(["show", "x", "--json", "--json"]) == 2
    assert capsys.readouterr().err.strip() == (
        "actcache: error: --json is given more than once; give it once (see `actcache show --help`)"
    )
    assert main(["push", "store/set_a", "store/set_b", "user/repo"]) == 2
    assert capsys.readouterr().err.strip() == (
        "actcache: error: `actcache push` takes fewer arguments: 'user/repo' left over (see `actcache push --help`)"
    )


def test_extract_takes_a_repeated_hook_as_a_list(capsys, tmp_path):
    """Both hooks reach the plan (the unknown one is named), not cyclopts' "specified multiple times"."""
    store = tmp_path / "store"
    argv = ["extract", "--hook", "blocks.1.hook_resid_post", "--hook", "blocks.0.hook_no_such", "--store", str(store)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "blocks.0.hook_no_such" in err and "more than once" not in err, err
    assert not store.exists()
