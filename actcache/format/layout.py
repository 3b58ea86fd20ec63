"""Where everything lives inside a store: every relative path is computed here and nowhere else.

<store>/<set_id>/manifest.json                consolidated view (written last)
<store>/<set_id>/shards/000012.safetensors    shard bytes (``.zst``/``.shuf.zst`` appended per codec)
<store>/<set_id>/done/000012.json             completion record (written after the shard)
<store>/_tokens/<tokens_id>/...               the token cache, same layout; end.json once exhausted
<store>/_content/<content_id>.json            which set holds a stream of token ids (``format.content``)
<store>/<set_id>/spill/000012.safetensors     a shuffle's pass-1 output for source shard 12 (then .json);
                                              removed once the shuffled set is complete
<store>/<set_id>/writers/<host>-<pid>.<start>-<8 hex>.json
                                              a live writer's lease (``storage.leases``): rm refuses meanwhile
<any of these>.tmp-<host>-<pid>.<start>-<8 hex>
                                              a local writer's temp file, renamed into place once written
(<start>: when the writer's process started, so that a later process given its pid is not taken for it; absent
where the host does not say, and in names of actcache before 0.7.1.)

``is_store_file`` says whether a path is one of these: what ``rm`` and ``gc`` may delete, and nothing else.
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


def _is_spill_file(rel: str) -> bool:
    return rel.startswith(f"{SPILL}/") and parse_spill_record(rel.removesuffix(".safetensors") + ".json") is not None


def tokens_dir(tokens_id: str) -> str:
    return f"{TOKENS_ROOT}/{tokens_id}"


CONTENT_ROOT = "_content"
_CONTENT_RE = re.compile(r"^c[0-9a-f]{24}\.json\Z")


def content_entry(content_id: str) -> str:
    return f"{CONTENT_ROOT}/{content_id}.json"


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


TOKEN_INDEX = "index.json"
"""A token cache's consolidated view (its manifest)."""

# A local writer's temp name: ``<target>.tmp-<host>-<pid>[.<start>]-<8 hex>`` (the host with "-" made "_"). Strict,
# so that a user's ``notes.tex.tmp-host-12-draft`` is never taken for one.
_WRITER = r"([^-/]+)-([0-9]{1,10})(?:\.([0-9]{1,20}))?-([0-9a-f]{8})"
_TEMP_RE = re.compile(r"^(.+)\.tmp-" + _WRITER + r"\Z")


def _writer(host: str, pid: int, start: int | None, tag: str) -> str:
    return f"{host}-{pid}-{tag}" if start is None else f"{host}-{pid}.{start}-{tag}"


def temp_name(path: str, host: str, pid: int, tag: str, start: int | None = None) -> str:
    """The temp file a writer of ``host``/``pid`` writes ``path`` to before renaming it (``tag``: 8 hex digits;
    ``start``: when the process started, ``storage.housekeeping.process_start``)."""
    return f"{path}.tmp-{_writer(host, pid, start, tag)}"


def parse_temp(name: str) -> tuple[str, str, int, int | None] | None:
    """(target, host, pid, start or None) of a temp name made by ``temp_name``; None for anything else."""
    m = _TEMP_RE.match(name)
    return (m.group(1), m.group(2), int(m.group(3)), _int(m.group(4))) if m else None


def _int(digits: str | None) -> int | None:
    return None if digits is None else int(digits)


WRITERS = "writers"
"""A set's folder of writer leases (``storage.leases``): one file per live extraction, ``cp``, ``shuffle``,
``stats``."""
# ``writers/<host>-<pid>[.<start>]-<8 hex>.json`` (the host with "-" made "_", as in temp names).
_WRITER_RE = re.compile(r"^writers/" + _WRITER + r"\.json\Z")


def writer_file(host: str, pid: int, tag: str, start: int | None = None) -> str:
    """The lease file (relative to a set's folder) of a writer of ``host``/``pid`` (``tag``: 8 hex digits;
    ``start``: as for ``temp_name``)."""
    return f"{WRITERS}/{_writer(host, pid, start, tag)}.json"


def parse_writer_file(rel: str) -> tuple[str, int, int | None] | None:
    """(host, pid, start or None) of a lease file made by ``writer_file``; None for anything else."""
    m = _WRITER_RE.match(rel)
    return (m.group(1), int(m.group(2)), _int(m.group(3))) if m else None


def is_set_file(rel: str) -> bool:
    """Whether ``rel`` (relative to a set's folder) is a file a set consists of (or a writer's lease)."""
    return (
        rel == MANIFEST
        or parse_writer_file(rel) is not None
        or parse_shard_file(rel) is not None
        or parse_record_file(rel) is not None
        or parse_spill_record(rel) is not None
        or _is_spill_file(rel)
    )


def is_token_file(rel: str) -> bool:
    """Whether ``rel`` (relative to a token cache's folder) is a file a token cache consists of."""
    shard = parse_shard_file(rel) is not None and rel.endswith(".safetensors")  # token caches are never compressed
    return rel in (TOKEN_INDEX, END) or shard or parse_record_file(rel) is not None


def is_store_file(rel: str) -> bool:
    """Whether ``rel`` (relative to a store's root) is a path actcache writes: a set's file in its folder, or a
    token cache's in ``_tokens/<id>``. ``rm`` and ``gc`` delete nothing else (temp files: see ``parse_temp``)."""
    head, _, rest = rel.partition("/")
    if head == CONTENT_ROOT:
        return bool(_CONTENT_RE.match(rest))
    if head == TOKENS_ROOT:
        tid, _, rest = rest.partition("/")
        return bool(SET_ID_RE.match(tid)) and tid.startswith("t") and is_token_file(rest)
    return bool(SET_ID_RE.match(head)) and not head.startswith("t") and is_set_file(rest)
