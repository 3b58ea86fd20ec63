"""Where everything lives inside a store: every relative path is computed here and nowhere else.

<store>/<set_id>/manifest.json                consolidated view (written last)
<store>/<set_id>/shards/000012.safetensors    shard bytes (``.zst``/``.shuf.zst`` appended per codec)
<store>/<set_id>/done/000012.json             completion record (written after the shard)
<store>/_tokens/<tokens_id>/...               the token cache, same layout; end.json once exhausted
<store>/<set_id>/spill/000012.safetensors     a shuffle's pass-1 output for source shard 12 (then .json);
                                              removed once the shuffled set is complete
"""

from __future__ import annotations

import re

MANIFEST = "manifest.json"
TOKENS_ROOT = "_tokens"
END = "end.json"

# ASCII digits and \Z, not \d and $: "$" also matches before a trailing newline, "\d" any Unicode digit.
SUFFIXES = {"none": "", "zstd": ".zst", "shuffle-zstd": ".shuf.zst"}  # appended to .safetensors, per codec
_SHARD_RE = re.compile(r"^shards/([0-9]{6})\.safetensors(" + "|".join(re.escape(s) for s in SUFFIXES.values()) + r")\Z")
_RECORD_RE = re.compile(r"^done/([0-9]{6})\.json\Z")
SET_ID_RE = re.compile(r"^t?[0-9a-f]{24}\Z")


def shard_file(index: int, codec: str) -> str:
    return f"shards/{index:06d}.safetensors" + SUFFIXES[codec]


def record_file(index: int) -> str:
    return f"done/{index:06d}.json"


SPILL = "spill"
_SPILL_RECORD_RE = re.compile(r"^spill/([0-9]{6})\.json\Z")


def spill_file(index: int) -> str:
    return f"{SPILL}/{index:06d}.safetensors"


def spill_record(index: int) -> str:
    return f"{SPILL}/{index:06d}.json"


def parse_spill_record(rel: str) -> int | None:
    m = _SPILL_RECORD_RE.match(rel)
    return int(m.group(1)) if m else None


def tokens_dir(tokens_id: str) -> str:
    return f"{TOKENS_ROOT}/{tokens_id}"


def parse_shard_file(rel: str) -> int | None:
    """Index of a shard file relative to its set folder; None for anything else (temp files)."""
    m = _SHARD_RE.match(rel)
    return int(m.group(1)) if m else None


def parse_record_file(rel: str) -> int | None:
    m = _RECORD_RE.match(rel)
    return int(m.group(1)) if m else None


def check_relative(rel: str) -> str:
    """Reject manifest entries that could escape the set folder (``..``, absolute paths, URLs)."""
    if parse_shard_file(rel) is None:
        raise ValueError(f"not a shard path: {rel!r}")
    return rel
