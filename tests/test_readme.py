"""README's SAE training example runs as printed (on the test set instead of the demo's)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


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
