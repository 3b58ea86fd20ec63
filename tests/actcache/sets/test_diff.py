"""``actcache diff``: shard by shard, against a whole-tensor reference, and on real sets through the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch

from actcache.cli.app import main
from actcache.errors import ActcacheError
from actcache.format.records import Record
from actcache.read.reader import Shard
from actcache.sets import diff


# -- the comparison against a slow reference, on sets built in memory ---------------------------------------
@dataclass
class MemorySet:
    """What ``diff.compare`` reads of an ActivationSet: manifest, records, url, read()."""

    url: str
    shards: dict[int, tuple[torch.Tensor, torch.Tensor]]
    context: int = 4
    d: int = 3
    codec: str = "none"
    reads: list[int] = field(default_factory=list)

    @property
    def manifest(self) -> dict:
        return {
            "key": {"tokens": {"context_size": self.context}},
            "d": self.d,
            "hook_shape": [self.d],
            "shard_tokens": 2 * self.context,
            "codec": self.codec,
        }

    @property
    def records(self) -> list[Record]:
        out = []
        for i, (acts, tokens) in sorted(self.shards.items()):
            digest = str(hash((acts.numpy().tobytes(), tokens.numpy().tobytes())))
            out.append(Record(i, f"shards/{i:06d}.safetensors", acts.shape[0], acts.shape[0] * self.context, digest, 0))
        return out

    def read(self, record: Record) -> Shard:
        self.reads.append(record.index)
        acts, tokens = self.shards[record.index]
        return Shard(record.index, acts, tokens)


def shard(seed: int, n_seq: int = 2, context: int = 4, d: int = 3, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n_seq, context, d, generator=g).to(dtype),
        torch.randint(0, 100, (n_seq, context), generator=g, dtype=torch.int32),
    )


def reference(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> tuple[float, int]:
    """max |a - b| and the count beyond tolerance, whole tensors at once, with torch.isclose."""
    x, y = a.double(), b.double()
    close = torch.isclose(x, y, atol=atol, rtol=rtol, equal_nan=True)
    both_nan = x.isnan() & y.isnan()
    d = (x - y).abs().nan_to_num(nan=math.inf, posinf=math.inf)
    d[both_nan | (x == y)] = 0
    return d.max().item(), int((~close).sum())


@pytest.mark.parametrize("atol,rtol", [(0.0, 0.0), (1e-3, 0.0), (0.0, 1e-2), (1e-2, 1e-2)])
def test_matches_the_whole_tensor_reference_across_slices(monkeypatch, atol, rtol):
    monkeypatch.setattr(diff, "SLICE_VALUES", 5)  # several slices per shard, one sequence at a time
    acts, tokens = shard(0, n_seq=3)
    noisy = (acts.float() + 1e-3 * torch.randn(acts.shape, generator=torch.Generator().manual_seed(1))).half()
    noisy[0, 0, 0] = float("nan")
    acts[1, 1, 1] = noisy[1, 1, 1] = float("nan")
    acts[2, 0, 2], noisy[2, 0, 2] = float("inf"), 7.0
    a, b = MemorySet("a", {0: (acts, tokens)}), MemorySet("b", {0: (noisy, tokens)})
    result = diff.compare(a, b, atol=atol, rtol=rtol)
    (d,) = result.shards
    max_abs, beyond = reference(acts, noisy, atol, rtol)
    assert (d.max_abs_diff, d.n_beyond) == (max_abs, beyond) and d.tokens_equal and d.differs and not result.same


def test_identical_bytes_are_not_read_and_missing_shards_count():
    s0, s1, s2 = shard(0), shard(1), shard(2)
    a, b = MemorySet("a", {0: s0, 1: s1, 2: s2}), MemorySet("b", {0: s0, 1: s1})
    result = diff.compare(a, b)
    assert [d.identical for d in result.shards] == [True, True] and a.reads == b.reads == []
    assert result.only_in_a == [2] and result.only_in_b == [] and not result.same
    assert diff.compare(MemorySet("a", {0: s0}), MemorySet("b", {0: s0})).same


def test_same_values_other_encoding_is_same_and_other_tokens_differ():
    acts, tokens = shard(3)
    zstd = MemorySet("b", {0: (acts.clone(), tokens)}, codec="zstd")
    result = diff.compare(MemorySet("a", {0: (acts, tokens)}), zstd)
    assert result.same and not result.shards[0].identical and zstd.reads == [0]
    other = tokens.clone()
    other[0, 0] += 1
    result = diff.compare(MemorySet("a", {0: (acts, tokens)}), MemorySet("b", {0: (acts.clone(), other)}))
    assert not result.same and not result.shards[0].tokens_equal and result.shards[0].max_abs_diff == 0


def test_sets_of_other_shapes_or_cuts_are_refused():
    with pytest.raises(ActcacheError, match="different shapes"):
        diff.compare(MemorySet("a", {0: shard(0)}), MemorySet("b", {0: shard(0, d=5)}, d=5))
    with pytest.raises(ActcacheError, match="holds 2 sequences in A and 1 in B"):
        diff.compare(MemorySet("a", {0: shard(0)}), MemorySet("b", {0: shard(0, n_seq=1)}))


# -- real sets through the CLI ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sets(make_config, tmp_path_factory) -> dict[str, str]:
    """Sets written by the flow's stages without Prefect (setwriter.extract_by_stages)."""
    from setwriter import extract_by_stages

    base = make_config(max_tokens=256, store=str(tmp_path_factory.mktemp("diff")))
    return {
        "fp16": extract_by_stages(base),
        "zstd": extract_by_stages(base.replace(codec="zstd")),
        "fp32": extract_by_stages(base.replace(dtype="float32")),
        "ctx16": extract_by_stages(base.replace(context_size=16, shard_tokens=64)),
    }


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_exit_codes_and_json(sets, tmp_path, capsys):
    from actcache.sets.copy import copy_set

    copy = copy_set(sets["fp16"], str(tmp_path)).url
    code, out, _ = run(capsys, "diff", sets["fp16"], copy, "--json")
    report = json.loads(out)
    assert code == 0 and report["same"] and report["shards_identical"] == report["shards_compared"] == 2

    code, out, _ = run(capsys, "diff", sets["fp16"], sets["zstd"])
    assert code == 0 and out.strip().splitlines()[-1].startswith("same: 2 shards compared, 0 byte-identical")

    code, out, _ = run(capsys, "diff", sets["fp16"], sets["fp32"], "--json")
    report = json.loads(out)
    assert code == 1 and report["shards_differ"] == [0, 1] and 0 < report["max_abs_diff"] < 1e-2
    assert all(s["tokens_equal"] and s["n_beyond"] > 0 for s in report["shards"])
    code, out, _ = run(capsys, "diff", sets["fp16"], sets["fp32"], "--atol", "1e-2")
    assert code == 0 and out.startswith("same: ")

    code, _, err = run(capsys, "diff", sets["fp16"], sets["ctx16"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "different shapes (context 32 vs 16" in lines[0]
