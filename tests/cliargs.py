"""`actcache extract` argument lists for tests: one place that turns settings into flags.

Most CLI tests extract the same small set (sequences of 32, 512 tokens, shards of 128, on the CPU); each names
only what it changes. An option given as None is left out (the CLI's default applies)."""

from __future__ import annotations

import json
import sys

SMALL = {"context_size": 32, "max_tokens": 512, "shard_tokens": 128, "device": "cpu"}

# Runs `actcache` as a separate process, as a user's shell does.
PROCESS = [sys.executable, "-m", "actcache.cli.app"]


def flag(name: str, value: object) -> list[str]:
    text = json.dumps(value) if isinstance(value, dict) else str(value)
    return [f"--{name.replace('_', '-')}", text]


def extract_argv(model: object, dataset: object, store: object | None, **options: object) -> list[str]:
    """``extract`` of ``dataset`` through ``model`` into ``store`` (None: added later), with ``SMALL`` unless
    ``options`` override it."""
    argv = ["extract", *flag("model", model), *flag("dataset", dataset)]
    for name, value in {"store": store, **SMALL, **options}.items():
        if value is not None:
            argv += flag(name, value)
    return argv


def config_argv(cfg, store: object = None, **options: object) -> list[str]:
    """``extract_argv`` for an ``ExtractConfig``'s model, dataset, hook (``hook=None``: the default) and store."""
    return extract_argv(cfg.model, cfg.dataset, cfg.store if store is None else store, **{"hook": cfg.hook, **options})
