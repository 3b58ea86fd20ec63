"""Tiny random-weight models for the test suite, built once per machine (import as ``modelcache``).

``tiny_model(arch, **cfg)`` builds with ``actcache.inputs.demo.build_tiny_model`` into ``$ACTCACHE_TEST_CACHE``
(default ``~/.cache/actcache-tests``), in a folder named by a key: the sha256 of the builder's source, its arguments
and the versions of the libraries that write the files. Later sessions find it there instead of building it again;
a change to the builder or an upgrade gives a new key, so a new folder. Each folder's file digests are recorded
when it is built: a folder that no longer matches them (a test wrote into it, a build was cut short) is built
again. A lock file serialises sessions that run at once (the machine may run several suites).
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from actcache.inputs import demo

BUILDER = (demo.build_tiny_model, demo.train_tokenizer, demo.tiny_config, demo.corpus_lines)
"""What a model's bytes follow from: their source is part of the key."""
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors")
DIGESTS = "digests.json"


def cache_root() -> Path:
    if env := os.environ.get("ACTCACHE_TEST_CACHE"):
        return Path(env)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "actcache-tests"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home (some CI sandboxes): the machine's temp folder still outlives a session
        root = Path(tempfile.gettempdir()) / f"actcache-tests-{os.getuid()}"
    return root


def key(arch: str, **cfg) -> str:
    h = hashlib.sha256()
    for fn in BUILDER:
        h.update(inspect.getsource(fn).encode())
    versions = {lib: metadata.version(lib) for lib in LIBRARIES}
    h.update(json.dumps({"arch": arch, "cfg": cfg, "versions": versions}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tiny_model(arch: str = "gpt2", **cfg) -> Path:
    """The folder of a tiny ``arch`` model (``save_pretrained`` layout) built with ``cfg``; built on first use."""
    root = cache_root() / "models"
    root.mkdir(parents=True, exist_ok=True)
    name = f"{arch}-{key(arch, **cfg)}"
    out, recorded = root / name, root / f"{name}.{DIGESTS}"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if out.is_dir() and recorded.is_file() and json.loads(recorded.read_text()) == _digests(out):
            return out
        shutil.rmtree(out, ignore_errors=True)
        recorded.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            built = demo.build_tiny_model(Path(tmp) / name, arch, **cfg)
            digests = _digests(built)
            os.rename(built, out)
        tmp_recorded = recorded.with_suffix(f".tmp{os.getpid()}")
        tmp_recorded.write_text(json.dumps(digests, indent=1, sort_keys=True))
        os.replace(tmp_recorded, recorded)  # last: a folder without its digests is not trusted
    return out
