"""The embedded offline default: a tiny random-weight model and a small corpus, built on first use.

Both are deterministic (fixed seed, fixed text), so their fingerprints, and therefore the demo's set
ids, are the same on every machine. Tests build other architectures with ``build_tiny_model``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from actcache.inputs.fingerprint import cache_dir

DEMO_MODEL = "builtin:tiny-gpt2"
DEMO_DATASET = "builtin:demo-corpus"
_VERSION = "v1"
ARCHS = ("gpt2", "llama", "neox")


def corpus_lines() -> list[str]:
    """Python's own help topics (``pydoc_data`` ships with CPython), one paragraph per line."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it: fall back to generated text
        import random

        rng = random.Random(0)
        words = "the model layer token residual stream attention head feature sparse probe".split()
        return [" ".join(rng.choice(words) for _ in range(60)) for _ in range(3000)]
    lines = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if para:
                lines.append(para)
    return lines


def demo_corpus() -> Path:
    path = cache_dir() / "builtin" / f"demo-corpus-{_VERSION}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return path


def train_tokenizer(lines: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``lines``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_config(arch: str, vocab_size: int, *, layers: int = 4, d: int = 64, ctx: int = 256):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    special: dict[str, Any] = {"bos_token_id": 0, "eos_token_id": 0}
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=ctx, n_embd=d, n_layer=layers, n_head=4, **special)
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=ctx,
            **special,
        )
    if arch == "neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=d,
            intermediate_size=4 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=ctx,
            **special,
        )
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def build_tiny_model(out: str | os.PathLike, arch: str = "gpt2", *, seed: int = 0, **cfg) -> Path:
    """Write a random-weight model + tokenizer with ``save_pretrained`` (atomically) and return its folder."""
    out = Path(out)
    if (out / "config.json").exists():
        return out  # before the imports: this check is on every demo run's start-up path
    import torch
    from transformers import AutoModelForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tokenizer = train_tokenizer(corpus_lines())
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), **cfg))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process built it first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def builtin_model(name: str) -> Path:
    arch = name.removeprefix("tiny-")
    if arch not in ARCHS:
        from actcache.errors import ActcacheError

        raise ActcacheError(
            f"unknown builtin model {name!r}; choose from {', '.join('builtin:tiny-' + a for a in ARCHS)}"
        )
    return build_tiny_model(cache_dir() / "builtin" / f"tiny-{arch}-{_VERSION}", arch)
