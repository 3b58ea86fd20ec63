"""Every extraction option, once: the CLI, the Python API and the Prefect flow are generated from it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from cyclopts import Parameter

from actcache.errors import ActcacheError, opt
from actcache.format.key import CODECS, DTYPES
from actcache.inputs.demo import DEMO_DATASET, DEMO_MODEL
from actcache.storage import secrets

if TYPE_CHECKING:
    from actcache.storage.store import StoreRef

MAX_TOKENS = 10**18
"""The largest --max-tokens: a million times the largest public corpora, and shard counts stay machine integers."""


def parse_storage_options(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ActcacheError(
            f"{opt('storage_options')} is not valid JSON ({e.msg} at char {e.pos}); "
            'pass an object like \'{"endpoint_url": "http://127.0.0.1:9000"}\''
        ) from None
    if not isinstance(value, dict):
        raise ActcacheError(f'{opt("storage_options")} must be a JSON object, e.g. \'{{"endpoint_url": "..."}}\'')
    return value


def _json_object(_type: Any, tokens: Any) -> dict[str, Any]:
    return parse_storage_options(tokens[0].value)


StorageOptions = Annotated[dict[str, Any], Parameter(converter=_json_object, accepts_keys=False, metavar="JSON")]
"""fsspec options as a JSON object on the command line (cyclopts alone would turn every value into a string)."""


@dataclass(frozen=True)
class ExtractConfig:
    # As a flow parameter: the Prefect server refuses an unknown option (a typo) when the run is created.
    __pydantic_config__ = {"extra": "forbid"}

    model: str = DEMO_MODEL
    """HF model id, a local directory written by save_pretrained, or builtin:tiny-gpt2 (offline demo)."""
    revision: str | None = None
    """Model revision (branch, tag or commit) on the HF hub."""
    hook: str = "blocks.1.hook_resid_post"
    """TransformerLens hook name, e.g. blocks.6.hook_resid_post, blocks.2.attn.hook_z; several comma-separated
    hooks share one forward pass, each stored as its own set. blocks.*.hook_mlp_out is that hook of every block,
    blocks.2:6.hook_mlp_out of blocks 2 to 5 (a slice: -4: is the last four)."""
    dataset: str = DEMO_DATASET
    """HF dataset name, or local/fsspec files: .txt (one document per line), .jsonl, .json, .parquet, globs."""
    dataset_config: str | None = None
    """HF dataset configuration name."""
    split: str = "train"
    """HF dataset split."""
    dataset_revision: str | None = None
    """HF dataset revision (commit sha, branch or tag)."""
    streaming: bool = True
    """Stream the HF dataset instead of downloading it whole."""
    text_column: str = "text"
    """Column holding the text (.txt files have the single column 'text')."""
    context_size: int = 128
    """Tokens per sequence; documents are packed and chunked to exactly this length (with --packing none: the most
    tokens of one example)."""
    prepend_bos: bool = True
    """Start every sequence with the BOS token."""
    separator: Literal["eos", "bos", "none"] = "eos"
    """Token placed between packed documents."""
    packing: Literal["concat", "none"] = "concat"
    """concat: documents packed into --context-size sequences (for SAEs); none: one sequence per document (an
    example), right-padded in batches of similar length, never joined with another (for probes; docs/probing.md)."""
    truncate: Literal["right", "left"] = "right"
    """With --packing none: which end of a document longer than --context-size is cut (the count is reported)."""
    positions: str = "all"
    """Rows stored per example with --packing none: all, last, first, mean (over the example's own tokens), or
    indices and slices of the sequence such as 0,-1 or -4: (with --packing concat only all)."""
    keep_columns: str = ""
    """With --packing none: comma-separated scalar dataset columns (int, float, bool, str) stored beside the
    activations, one value per example (e.g. label,source)."""
    token_column: str = ""
    """A column of token ids (pretokenized data, checked against the vocabulary) read instead of tokenizing
    --text-column, each row a document as its text would be (both packing modes); empty: tokenize text."""
    heads: str = ""
    """Heads kept of a hook with a head axis (attn.hook_z, hook_q, hook_k, hook_v, hook_result), as indices and
    slices (0,5,7 or 0:4); empty: all. Only they are computed into the shards (both packing modes)."""
    dims: str = ""
    """Entries kept of the hook's last axis (neurons of mlp.hook_post, a subspace of the residual stream, or of
    each kept head), as indices and slices (3,17 or 0:64); empty: all. Both packing modes."""
    max_tokens: int = 1 << 20
    """Stop after this many tokens (rounded down to whole sequences); raising it extends the same set."""
    shard_tokens: int = 0
    """Tokens per shard (rounded down to whole sequences); the resulting sequences per shard are part of the set's
    key. 0 (default): as many as fit in --shard-bytes."""
    shard_bytes: int = 1 << 28
    """Target size of a shard before the codec, in bytes, when --shard-tokens is 0 (the widest hook of a pass sets
    it). The default keeps the flow's per-shard cost under about 2% of a GPU's forward pass (bench/RESULTS.md);
    a process holds 1-3 shards in memory."""
    batch_size: int = 0
    """Sequences per forward pass; 0: automatic (on CUDA the most that fit, from 2^16 tokens per pass down, found
    once per process and halved on an out-of-memory error; 8 on CPU)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    """Storage dtype of the activations."""
    model_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype the model computes in (use float32 on CPU: half-precision matmuls are very slow there)."""
    codec: Literal["none", "zstd", "shuffle-zstd"] = "none"
    """Lossless codec around each safetensors shard (shuffle-zstd: byte-shuffled tensor data, then zstd)."""
    codec_level: int = 3
    """zstd level (ignored for codec none)."""
    store: str = "./activations"
    """Where sets are written: a local folder or any fsspec URL (s3://bucket/prefix)."""
    storage_options: StorageOptions = field(default_factory=dict)
    """JSON object passed to fsspec for the store and dataset (e.g. {"endpoint_url": "..."}); never credentials
    (refused at any depth: use the AWS chain, {"profile": NAME} or --aws-credentials-block)."""
    aws_credentials_block: str | None = None
    """Name of a Prefect AwsCredentials block for an s3:// store (otherwise the AWS chain: env, profile, role)."""
    device: str = "auto"
    """cpu, cuda, cuda:1, mps, or auto (cuda when available)."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run (off unless asked; recorded in the manifest)."""
    verify_existing: bool = False
    """Re-hash every stored shard, token shard and completion record instead of trusting sizes and modification
    times (what `actcache verify` asks for when only hashing can see the damage)."""

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("model_dtype", self.model_dtype, DTYPES)
        _check_choice("codec", self.codec, CODECS)
        _check_choice("separator", self.separator, ("eos", "bos", "none"))
        _check_choice("packing", self.packing, ("concat", "none"))
        _check_choice("truncate", self.truncate, ("right", "left"))
        if self.context_size < 2:
            raise ActcacheError(f"{opt('context_size')} must be at least 2, got {self.context_size}")
        if self.max_tokens > MAX_TOKENS:
            raise ActcacheError(
                f"{opt('max_tokens')} {self.max_tokens} is above 10^18, far more than any dataset "
                f"holds; for a whole dataset pass a number above its size (extraction stops where "
                f"the data ends)"
            )
        if self.max_tokens < self.context_size:
            raise ActcacheError(
                f"{opt('max_tokens')} {self.max_tokens} is below one context of {self.context_size} "
                f"tokens; raise {opt('max_tokens')} or lower {opt('context_size')}"
            )
        if self.shard_tokens and self.shard_tokens < self.context_size:
            raise ActcacheError(
                f"{opt('shard_tokens')} {self.shard_tokens} is below one context of "
                f"{self.context_size} tokens; raise {opt('shard_tokens')} (or 0 to size shards by "
                f"{opt('shard_bytes')})"
            )
        if self.shard_bytes < 1 << 20:
            raise ActcacheError(f"{opt('shard_bytes')} must be at least 1 MiB (1048576), got {self.shard_bytes}")
        if self.batch_size < 0:
            raise ActcacheError(f"{opt('batch_size')} must be at least 1 (or 0: automatic), got {self.batch_size}")
        if self.codec != "none" and not 1 <= self.codec_level <= 22:
            raise ActcacheError(f"{opt('codec_level')} must be 1..22 for {self.codec}, got {self.codec_level}")
        if not isinstance(self.storage_options, dict):
            raise ActcacheError(f'{opt("storage_options")} must be a JSON object, e.g. \'{{"endpoint_url": "..."}}\'')
        for f in dataclasses.fields(self):  # every input travels: manifest, flow parameters, logs, errors
            secrets.check_value(getattr(self, f.name), opt(f.name))
            _check_utf8(getattr(self, f.name), opt(f.name))
        secrets.check_options(self.storage_options)
        self._check_examples()
        if not isinstance(self.hook, str) or not all(self.hooks):
            raise ActcacheError(
                f"{opt('hook')} needs one or more comma-separated hook names, e.g. blocks.6.hook_resid_post"
            )

    def _check_examples(self) -> None:
        from actcache.extraction.positions import parse

        parse(self.positions, self.context_size)  # a one-line error for a bad or out-of-range position
        if self.packing == "concat":
            if self.positions.strip() != "all":
                raise ActcacheError(
                    f"{opt('positions')} {self.positions} needs one sequence per example: add "
                    f"{opt('packing', 'none')} (packed sequences store every position)"
                )
            if self.keep_columns.strip():
                raise ActcacheError(
                    f"{opt('keep_columns')} needs one sequence per example: add {opt('packing', 'none')}"
                )
        if any(not c for c in self.kept_columns) and self.keep_columns.strip():
            raise ActcacheError(f"{opt('keep_columns')} {self.keep_columns!r} has an empty name; use e.g. label,source")
        kept = set(self.kept_columns)
        for c in self.kept_columns:  # a text column NAME is stored as column.NAME.utf8 and column.NAME.offsets
            stem, _, part = c.rpartition(".")
            if stem in kept and part in ("utf8", "offsets"):
                raise ActcacheError(
                    f"{opt('keep_columns')} names both {stem!r} and {c!r}, whose stored names would collide (a text "
                    f"column {stem!r} is stored with a {c!r} part); keep one"
                )
        if self.text_column in self.kept_columns:
            raise ActcacheError(f"{opt('keep_columns')} names the text column {self.text_column!r}; leave it out")

    @property
    def kept_columns(self) -> tuple[str, ...]:
        """``keep_columns`` as names, in order, once each."""
        return tuple(dict.fromkeys(c.strip() for c in self.keep_columns.split(","))) if self.keep_columns else ()

    @property
    def hooks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(h.strip() for h in self.hook.split(",")))

    @property
    def store_ref(self) -> StoreRef:
        """``store``, ``storage_options`` and ``aws_credentials_block`` as the one value that travels."""
        from actcache.storage.store import StoreRef  # not at import: the CLI reads this module before it needs fsspec

        return StoreRef(self.store, dict(self.storage_options), self.aws_credentials_block)

    @property
    def target_seqs(self) -> int:
        return self.max_tokens // self.context_size

    @property
    def level(self) -> int:
        """The codec level that changes bytes (0 when there is no codec, so it cannot split sets)."""
        return self.codec_level if self.codec != "none" else 0

    def replace(self, **changes: Any) -> ExtractConfig:
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ActcacheError(f"unsupported {opt(name)} {value!r}; choose one of {', '.join(choices)}")


def _check_utf8(value: Any, given_as: str) -> None:
    """Refuse a string that is not UTF-8 text: a path with a stray byte (Python holds it as a lone surrogate) cannot
    be written into a manifest or the flow's parameters, which are JSON text, and failed there after the run began."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ActcacheError(
                f"{given_as} is not UTF-8 text (a path with a byte such as 0xff in a name?); it is stored in the "
                "manifest as text: rename the folder or file, or give another"
            ) from None
