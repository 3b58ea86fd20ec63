"""The software and device that computed a shard, recorded with it; a set whose shards disagree is reported.

Many workers may write the shards of one set (fan-out partitions, reruns after a crash). The set key fixes
the model, the inputs and the engine, not the library versions or the device, and those move the low bits
of the numbers: a mixed fleet writes such shards under one set id. Each completion record carries its
writer's environment (``extra["env"]``, from ``current``); ``differences`` says where a set's shards
disagree. A different engine contradicts the key and is a problem (``verify`` fails); anything else is a
warning: the shards are the same model's activations, equal to rounding, and a rerun would not change them.
"""

from __future__ import annotations

import functools
import platform
from importlib import metadata
from typing import Any

PACKAGES = ("actcache", "torch", "transformers", "transformer-lens")
FIELDS = (*PACKAGES, "device", "device_name", "cuda", "engine")
"""Every field of a recorded environment, in the order differences are listed."""


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "unknown"
    return out


@functools.lru_cache(maxsize=8)
def _device(device: str) -> dict[str, str]:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return {"device": "cuda", "device_name": torch.cuda.get_device_name(dev), "cuda": str(torch.version.cuda)}
    # On a CPU the kernels (and so the rounding) follow the instruction set torch picked.
    return {"device": dev.type, "device_name": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"}


def current(device: str, engine: str) -> dict[str, str]:
    """This process's environment for a shard computed on ``device`` (as configured: ``auto``, ``cuda:1``)."""
    from actcache.extraction.forward import pick_device

    return {**_versions(), **_device(pick_device(device)), "engine": engine}


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> 'shards 0-2, 5'."""
    parts, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ("shard " if len(indices) == 1 else "shards ") + ", ".join(parts)


def differences(envs: dict[int, dict[str, Any] | None]) -> dict[str, str]:
    """{field: 'torch 2.13.0 (shards 0-3), 2.9.0 (shard 4)'} for each field on which the shards disagree.

    ``envs`` maps shard index to its recorded environment; None (a record from before environments were
    recorded) counts as ``unrecorded`` once any shard has one.
    """
    if not any(envs.values()):
        return {}
    out = {}
    for f in FIELDS:
        groups: dict[str, list[int]] = {}
        for index in sorted(envs):
            env = envs[index]
            value = "unrecorded" if env is None else str(env.get(f, "-"))
            groups.setdefault(value, []).append(index)
        if len(groups) > 1:
            out[f] = f"{f} " + ", ".join(f"{v} ({_ranges(ix)})" for v, ix in groups.items())
    return out
