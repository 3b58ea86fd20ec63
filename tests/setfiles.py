"""Compare whole stores: every file's bytes, manifests without their timestamps (import as ``setfiles``).

A manifest's seal (``records.SEAL``) hashes its timestamps too, so it is dropped with them.
"""

from __future__ import annotations

import json
from pathlib import Path

from actcache.format import layout, records


def normalized(files: dict[str, bytes]) -> dict[str, bytes]:
    """Manifests without their timestamps; every other file as is."""
    out = {}
    for rel, data in files.items():
        if rel.endswith(layout.MANIFEST):
            m = json.loads(data)
            m.pop("created_at"), m.pop("updated_at"), m.pop(records.SEAL, None)
            data = json.dumps(m, sort_keys=True).encode()
        out[rel] = data
    return out


def local_tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (temp files included: none may be left), normalized."""
    return normalized({str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})
