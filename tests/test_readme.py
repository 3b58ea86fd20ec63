"""README's and docs/*.md's Python blocks run as printed, on the test set instead of the demo's.

(Their shell blocks' ``actcache`` lines run in tests/test_shell_blocks.py, with ``SHELL_SUBSTITUTE``: the same
substitutions plus the hub's model and dataset, big ``--max-tokens`` and the docs' S3 bucket, all listed below.)

Every ```python block runs, except one preceded by ``<!-- no-run: why -->`` (the network, another environment).
``SUBSTITUTE`` is the one place where a block's paths become the offline fixtures: the demo's set URL (which
`make demo` prints) and an S3 URL become the shared test set, the demo's store a fresh folder. A block preceded by
``<!-- example-set: ... -->`` reads ``url``, a ``--packing none`` set (docs/probing.md): it runs with ``url`` bound
to one, made with ``--positions last --keep-columns label``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SUBSTITUTE = {
    "./activations/<set_id>": "{set}",
    "s3://my-bucket/activations/<set_id>": "{set}",
    'store="./activations"': 'store="{store}"',
}
# Shell blocks (tests/test_shell_blocks.py) also take these, longest first: the hub's GPT-2 and pile-10k become the
# tiny GPT-2 and the test corpus, its layer 6 the tiny model's layer 1, ten million tokens a couple of thousand,
# the docs' example bucket the test's moto bucket. statements.jsonl and pretokenized.parquet are written into the
# block's working folder under those names.
SHELL_SUBSTITUTE = {
    **SUBSTITUTE,
    "s3://my-bucket/activations": "{s3}",
    "--model gpt2 ": "--model {gpt2} ",
    "--dataset NeelNanda/pile-10k": "--dataset {corpus}",
    "blocks.6.": "blocks.1.",
    "--max-tokens 10000000": "--max-tokens 2048",
}
BLOCK = re.compile(r"(<!-- [a-z-]+(?::[^>]*)? -->\n)?```python\n(.*?)```", re.S)


def _blocks(kind: str = "") -> list[tuple[str, int, str]]:
    """Each page's python blocks to run (page, index, code): those with no marker, or those marked ``kind``."""
    out = []
    for page in PAGES:
        for i, m in enumerate(BLOCK.finditer(page.read_text())):
            marker = m.group(1) or ""
            if kind or "example-set" in marker:
                if kind and f"<!-- {kind}:" in marker:
                    out.append((str(page.relative_to(ROOT)), i, m.group(2)))
                continue
            if "no-run" in marker or "sae-example" in marker:  # the SAE loop: its own test below
                continue
            if "transcoder-example" in marker:  # two sets of one extraction: its own test in tests/test_docs.py
                continue
            out.append((str(page.relative_to(ROOT)), i, m.group(2)))
    return out


def test_the_sae_example_trains(extracted_set, capsys):
    text = README.read_text()
    code = re.search(r"<!-- sae-example -->\n```python\n(.*?)```", text, re.S).group(1)
    assert 'SET = "./activations/<set_id>"' in code
    assert "range(300)" in code and "step % 100" in code
    code = code.replace("./activations/<set_id>", extracted_set).replace("range(300)", "range(60)")
    exec(compile(code.replace("step % 100", "step % 20"), "README.md", "exec"), {})  # a tenth: the set is tiny
    lines = capsys.readouterr().out.splitlines()
    mse = [float(re.search(r"mse ([0-9.]+)", line).group(1)) for line in lines]
    assert len(mse) == 3 and mse[-1] < mse[0], lines


@pytest.mark.parametrize("page,index,code", _blocks(), ids=[f"{p}#{i}" for p, i, _ in _blocks()])
def test_python_blocks_run_as_printed(page, index, code, extracted_set, tmp_path, prefect_harness, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes stays here
    for text, fixture in SUBSTITUTE.items():
        code = code.replace(text, fixture.format(set=extracted_set, store=tmp_path / "activations"))
    assert "<set_id>" not in code, f"{page} block {index} names a set the substitutions do not cover"
    exec(compile(code, f"{page} block {index}", "exec"), {"__name__": "__readme__"})


def test_pages_link_to_pages_that_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(((?:\.\./|docs/)?[\w./-]+\.md)", page.read_text()):
            assert (page.parent / target).resolve().is_file(), (page, target)


@pytest.fixture(scope="module")
def example_set(make_config, tmp_path_factory) -> str:
    """A --packing none set of 40 labelled statements (last token, label kept), as docs/probing.md's blocks read."""
    import json

    from actcache.extraction import examples
    from actcache.extraction.plan import make_plan
    from actcache.inputs import demo

    root = tmp_path_factory.mktemp("example-set")
    rows = [{"text": " ".join(line.split()[:20]), "label": i % 2} for i, line in enumerate(demo.corpus_lines()[:40])]
    (root / "statements.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = make_config(
        dataset=str(root / "statements.jsonl"),
        store=str(root / "store"),
        packing="none",
        positions="last",
        keep_columns="label",
        max_tokens=40 * 32,
        dtype="float32",
    )
    (url,) = examples.extract(make_plan(cfg))
    return url


@pytest.mark.parametrize(
    "page,index,code", _blocks("example-set"), ids=[f"{p}#{i}" for p, i, _ in _blocks("example-set")]
)
def test_example_set_blocks_run_as_printed(page, index, code, example_set, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "__readme__", "url": example_set}
    exec(compile(code, f"{page} block {index}", "exec"), scope)
    if "acc" in scope:  # the probe: fitted and scored on held-out examples
        assert 0.0 <= float(scope["acc"]) <= 1.0 and scope["direction"].shape == (32,)


def test_every_python_block_is_collected_or_says_why():
    """Any fence that opens Python (indented in a list, ```py, ```python3 ...) is one that BLOCK finds: run above, or
    skipped by a marker that says why (or run by its own test: sae-example, transcoder-example, example-set)."""
    fence = re.compile(r"^[ \t]*```(?:py|python|python3|pycon)[ \t]*$", re.M)
    for page in PAGES:
        text = page.read_text()
        found = len(BLOCK.findall(text))
        assert len(fence.findall(text)) == found, f"{page.name}: a Python block that tests/test_readme.py does not see"
        for marker, _ in BLOCK.findall(text):
            assert not marker or any(m in marker for m in ("no-run:", "-example", "example-set:")), (page.name, marker)
