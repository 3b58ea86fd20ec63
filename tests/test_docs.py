"""The examples in docs/ run as written (on tiny sets)."""

from __future__ import annotations

import re
from pathlib import Path

import setwriter

ROOT = Path(__file__).resolve().parents[1]


def test_the_transcoder_example_trains(tiny_models, corpus, tmp_path, capsys):
    from actcache.config import ExtractConfig

    mlp_in, mlp_out = setwriter.extract_sets_by_stages(
        ExtractConfig(
            model=str(tiny_models["gpt2"]),
            hook="blocks.1.ln2.hook_normalized,blocks.1.hook_mlp_out",
            dataset=str(corpus),
            context_size=32,
            max_tokens=1024,
            shard_tokens=256,
            batch_size=4,
            store=str(tmp_path),
            device="cpu",
        )
    )
    text = (ROOT / "docs" / "training.md").read_text()
    code = re.search(r"<!-- transcoder-example -->\n```python\n(.*?)```", text, re.S).group(1)
    code = code.replace("./activations/<mlp_in_set_id>", mlp_in).replace("./activations/<mlp_out_set_id>", mlp_out)
    exec(compile(code, "docs/training.md", "exec"), {})
    fvu = [float(re.search(r"fvu ([0-9.]+)", line).group(1)) for line in capsys.readouterr().out.splitlines()]
    assert len(fvu) == 4 and fvu[-1] < fvu[0], fvu
