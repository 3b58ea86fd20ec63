"""actcache installed beside a trainer from the registry, each in a fresh venv: the trainer learns from a set in
place and what it saves names the set.

SAELens pins TransformerLens 3 (actcache's [extract] needs 4), so the actcache wheel goes in without the extra.
torch's CPU wheel goes first (a bare torch requirement would pull a CUDA build). Needs PyPI; 41 s and 37 s here
with the machine's caches warm.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import depscache
import pytest
import setwriter
import torch

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(check=True, capture_output=True, text=True, timeout=1200)


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` that shows the program's own stderr when it fails (CalledProcessError hides it)."""
    try:
        return subprocess.run(args, **RUN, **kwargs)
    except subprocess.CalledProcessError as e:
        raise AssertionError(f"{args[:3]} exited {e.returncode}:\n{e.stderr[-4000:]}") from None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The actcache wheel, built from a copy of the checkout's files (tracked or new, not ignored): a build in
    the checkout leaves build/ and an egg-info whose stale version importlib.metadata would find first."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, **RUN
    ).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (tmp / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tmp / "src" / rel)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp)]
    subprocess.run([*pip, str(tmp / "src")], **RUN)
    (whl,) = tmp.glob("actcache-*.whl")
    return whl


SET = dict(shards=3, seqs=4, ctx=16, d=8, with_stats=True, with_moments=True, bos_scale=5)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory) -> str:
    """A set with per-token moments (as extraction writes them) and BOS rows 5 times larger than the others."""
    return setwriter.write_set(tmp_path_factory.mktemp("store"), **SET)


@pytest.fixture(scope="module")
def mlp_out_set(tmp_path_factory) -> str:
    """Another hook's set of ``train_set``'s tokens (its MLP's output, say): each row a fixed function of the same
    row of ``train_set`` and of nothing else, so only rows read in line teach a transcoder anything."""
    w = torch.randn(SET["d"], SET["d"], generator=torch.Generator().manual_seed(1))

    def mlp(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.float() @ w).to(x.dtype)

    return setwriter.write_set(tmp_path_factory.mktemp("store"), hook="blocks.0.hook_mlp_out", transform=mlp, **SET)


def venv_beside(tmp: Path, trainer: str, wheel: Path) -> Path:
    """A fresh venv with the CPU torch, ``trainer`` from the registry, then the actcache wheel (no extra).

    torch and actcache's base requirements come from the per-machine folder of tests/depscache.py (a ``.pth``
    file), as a user's CPU torch installed first; what the trainer pins otherwise goes into the venv itself,
    ahead of that folder on sys.path. ``--no-compile``: the programs compile what they import, not all of it."""
    py = depscache.fresh_venv(tmp / "venv", depscache.base_dependencies(depscache.TORCH))
    pip = [str(py), "-m", "pip", "install", "-q", "--no-compile"]
    subprocess.run([*pip, trainer], **RUN)  # its own pins (TransformerLens 3 for SAELens), not actcache's
    subprocess.run([*pip, str(wheel)], **RUN)
    return py


FOLDED = """
import sys, torch, actcache
from actcache.read import saelens
from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
from importlib.metadata import version
from importlib.util import find_spec

assert version("transformer-lens").startswith("3.") and find_spec("prefect") is None, "not SAELens's environment"
assert "+cpu" in torch.__version__, torch.__version__
ds = actcache.ActivationDataset(sys.argv[1], batch_size=16, exclude_special_tokens=True, drop_bos=True)
cfg = StandardTrainingSAEConfig(d_in=ds.d, d_sae=32, normalize_activations="expected_average_only_in")
sae = StandardTrainingSAE(cfg)
w = sae.W_enc.detach().clone()
saelens.train(ds, sae, training_tokens=0)  # no step: only the scale is folded into the weights
torch.testing.assert_close(sae.W_enc.detach(), w * ds.stats["scale"])
print("folded", ds.stats["scale"])
"""


def test_saelens_trains_from_a_set_in_place_beside_actcache(tmp_path, wheel, train_set):
    py = venv_beside(tmp_path, "sae-lens", wheel)
    out = tmp_path / "sae"
    recipe = str(ROOT / "docs" / "recipes" / "saelens_train.py")
    # cwd elsewhere: the installed wheel is imported, not the checkout.
    run([str(py), recipe, train_set, str(out), "--steps", "5", "--batch", "16"], cwd=tmp_path)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["dataset_path"] == train_set  # the set's URL, not ""
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post" and cfg["d_in"] == 8
    assert cfg["normalize_activations"] == "none"  # the set's scale is folded in: the SAE reads raw activations
    assert (out / "sae_weights.safetensors").stat().st_size > 0
    # The scale SAELens folded in is the set's exact one over the rows kept (no BOS, no special tokens).
    assert "folded" in run([str(py), "-c", FOLDED, train_set], cwd=tmp_path).stdout


LOADS = """
import sys, torch, actcache
from sparsify import SparseCoder

coder = SparseCoder.load_from_disk(sys.argv[1])
torch.manual_seed(0)
untrained = SparseCoder(coder.d_in, coder.cfg)
ds = actcache.ActivationDataset(sys.argv[2], batch_size=64, dtype=torch.float32, exclude_special_tokens=True,
                                drop_bos=True, normalize="scale")
x = next(iter(ds))
fvu, before = coder(x).fvu.item(), untrained(x).fvu.item()
assert fvu < 0.6 * before, (fvu, before)  # it learned the set's rows
print("fvu", fvu, "untrained", before)
"""


TRANSCODES = """
import sys, torch, actcache
from sparsify import SparseCoder

coder = SparseCoder.load_from_disk(sys.argv[1])
assert coder.cfg.transcode


def rows(url):  # one set alone, in order: its rows line up with the other's by construction, not by the tuples
    (x,) = actcache.ActivationDataset(url, batch_size=1 << 20, dtype=torch.float32, exclude_special_tokens=True,
                                      drop_bos=True, normalize="scale")
    return x


x, y = rows(sys.argv[2]), rows(sys.argv[3])
with torch.no_grad():
    fvu, shifted = coder(x, y).fvu.item(), coder(x, y.roll(1, 0)).fvu.item()
# Trained on tuples out of line, it could only learn the targets' mean (FVU about 1 on rows in line).
assert fvu < 0.6 and shifted > 1.5 * fvu, (fvu, shifted)
print("fvu", fvu, "against the next row's target", shifted)
"""


def test_sparsify_trains_from_a_set_beside_actcache(tmp_path, wheel, train_set, mlp_out_set):
    py = venv_beside(tmp_path, "eai-sparsify", wheel)
    out = tmp_path / "coder"
    recipe = str(ROOT / "docs" / "recipes" / "sparsify_train.py")
    args = [train_set, str(out), "--steps", "30", "--batch", "16", "--expansion", "4", "-k", "4"]
    run([str(py), recipe, *args, "--dead-after", "64"], cwd=tmp_path)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["actcache"]["sets"] == [train_set] and cfg["d_in"] == 8 and cfg["k"] == 4
    assert "fvu" in subprocess.run([str(py), "-c", LOADS, str(out), train_set], cwd=tmp_path, **RUN).stdout

    # The transcoder path, in the same venv: MLP input to MLP output, two sets read as row-aligned tuples.
    tc = tmp_path / "transcoder"
    args = [train_set, str(tc), "--target", mlp_out_set, "--steps", "200", "--batch", "32", "--expansion", "4"]
    run([str(py), recipe, *args, "-k", "4", "--dead-after", "64"], cwd=tmp_path)
    cfg = json.loads((tc / "cfg.json").read_text())
    assert cfg["transcode"] and cfg["actcache"]["sets"] == [train_set, mlp_out_set]
    assert cfg["actcache"]["hooks"] == ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]
    assert "fvu" in run([str(py), "-c", TRANSCODES, str(tc), train_set, mlp_out_set], cwd=tmp_path).stdout
