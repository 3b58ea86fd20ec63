"""Read a set of one sequence per example (``--packing none``) back whole, in dataset order."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from actcache.errors import ActcacheError, Failure
from actcache.storage.store import StoreRef


@dataclass
class LoadedExamples:
    """An example set in memory: row i of every field is example i, in dataset order."""

    activations: torch.Tensor
    """``[n_examples, n_positions, d]`` in the storage dtype (``n_positions`` is 1 for last, first and mean; with
    ``all`` it is the context size, and rows past an example's length are 0)."""
    lengths: torch.Tensor
    """``[n_examples]`` int32: tokens of each example as fed to the model (BOS included)."""
    example_index: torch.Tensor
    """``[n_examples]`` int64: each example's row in the dataset."""
    tokens: torch.Tensor
    """``[n_examples, context_size]`` int32, 0 past each example's length."""
    columns: dict[str, torch.Tensor | list[str]] = field(default_factory=dict)
    """Each kept column: a tensor for numbers and bools, a list for strings."""
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.lengths)


def load_examples(
    url: str | StoreRef, storage_options: dict[str, Any] | None = None, *, credentials_block: str | None = None
) -> LoadedExamples:
    """The whole example set at ``url`` (every shard checked against its sha256), as ``LoadedExamples``."""
    from actcache.read import example_rows
    from actcache.read.reader import open_set

    s = open_set(url, storage_options, credentials_block=credentials_block)
    info = s.manifest.get("examples")
    if not info:
        raise ActcacheError(
            f"set {s.url} holds packed sequences, not one row per example; read it with open_set or "
            "ActivationDataset (load_examples reads sets made with --packing none)"
        )
    parts: dict[str, list] = {}
    for rec in sorted(s.records, key=lambda r: r.index):
        # Mapped (copy-on-write) on a local store: the tensors are writable views of it, with no copy.
        s.check_stored_size(rec)
        data = s.store.read_mapped(f"{s.set_id}/{rec.file}", size=rec.bytes)
        if hashlib.sha256(data).hexdigest() != rec.sha256:
            raise Failure(f"shard {rec.index} of {s.url} fails its checksum; rerun the extraction to repair it")
        t = example_rows.decode(s, rec, data)  # header checked against the manifest and record, before any tensor
        for name, v in t.items():
            parts.setdefault(name, []).append(v)
    if not parts:
        raise ActcacheError(f"set {s.url} holds no shard yet")
    columns: dict[str, torch.Tensor | list[str]] = {}
    for name, kind in info.get("columns", {}).items():
        if kind == "str":
            values: list[str] = []
            for blob, offsets in zip(parts[f"column.{name}.utf8"], parts[f"column.{name}.offsets"], strict=True):
                raw, o = bytes(blob.numpy().tobytes()), offsets.tolist()
                values.extend(raw[o[i] : o[i + 1]].decode() for i in range(len(o) - 1))
            columns[name] = values
        else:
            columns[name] = torch.cat(parts[f"column.{name}"])
    ctx = s.key.tokens.context_size  # type: ignore[union-attr]  # a set with "examples" is an extraction's (SetKey)
    tokens = []
    for flat, lengths in zip(parts["tokens"], parts["lengths"], strict=True):  # stored one example after another
        out = flat.new_zeros((len(lengths), ctx))
        start = 0
        for i, n in enumerate(lengths.tolist()):
            out[i, :n] = flat[start : start + n]
            start += n
        tokens.append(out)
    acts = parts["activations"]
    if acts[0].dim() == 2:  # positions all: each example's real rows one after another; padded here with zeros
        padded = []
        for flat, lengths in zip(acts, parts["lengths"], strict=True):
            out = flat.new_zeros((len(lengths), ctx, flat.shape[-1]))
            start = 0
            for i, n in enumerate(lengths.tolist()):
                out[i, :n] = flat[start : start + n]
                start += n
            padded.append(out)
        acts = padded
    return LoadedExamples(
        torch.cat(acts),
        torch.cat(parts["lengths"]),
        torch.cat(parts["example_index"]),
        torch.cat(tokens),
        columns,
        s.manifest,
    )
