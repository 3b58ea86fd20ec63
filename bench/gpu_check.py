"""One check of every CUDA path, on one GPU, in a few minutes (about 3 on an H100-class GPU).

    .venv/bin/python bench/gpu_check.py              # or: .venv/bin/python bench/run.py --only gpu
    .venv/bin/python bench/gpu_check.py --rehearse   # the same steps on the CPU, tiny model: checks the plumbing

Model: GPT-2-small shape with random weights (bench/run.py builds it once in the cache; no network), hook
blocks.5.hook_resid_post (the hf-sdpa engine, blocks 0..5 loaded). Checks, in order (``CHECKS``):
  auto_batch       --batch-size 0 on CUDA takes AUTO_BATCH_TOKENS per pass, and equals a fixed batch of 4
  oom_halving      with the process capped (set_per_process_memory_fraction) at what the weights take + 256 MiB,
                   the automatic batch runs out of memory, halves until it fits, remembers the size, and equals
                   the uncapped result
  pinned_shards    a shard file in pinned memory, filled by the forward pass, has the bytes shard.encode writes for
                   the same tensors (codecs none and shuffle-zstd), and its buffer is reused by the next shard
  cpu_vs_gpu_diff  `actcache extract --device cpu` and `--device cuda` (float32), then `actcache diff` within
                   atol=DIFF_ATOL, rtol=DIFF_RTOL: the documented agreement of a GPU set with a CPU one
  reader_device    ActivationDataset(device="cuda", pin_memory=True) yields every batch on the GPU, equal to the
                   batches read on the CPU, with the copies on a side stream; float32 standardised batches cross
                   as stored and are cast and normalised on the GPU, with the host's bits
  gated_hooks      blocks.2.attn.hook_result and hook_mlp_in (off in TransformerLens 4 until a flag opens them for
                   their pass) extracted on CUDA agree with the CPU as cpu_vs_gpu_diff's hook does
  tokens_per_s     actcache's extraction step (tokens in host memory -> activations in pinned host memory) against
                   the same truncated HF GPT2Model (blocks 0..5, no final norm, sdpa) run by hand with the same batch;
                   fails below MIN_SPEED_RATIO of it
Prints one table; exit 0 when every check passed, 1 when one failed, 3 when there is no CUDA device (one line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOOK = "blocks.5.hook_resid_post"
GATED = "blocks.2.attn.hook_result,blocks.2.hook_mlp_in"
NO_CUDA = 3
"""Exit status when this machine has no CUDA device (distinct from 1, a failed check)."""
DIFF_ATOL, DIFF_RTOL = 1e-4, 1e-3
"""CPU and GPU float32 sets agree within these (sdpa kernels and matmul accumulation order differ; TF32 is off)."""
SAME_ATOL, SAME_RTOL = 1e-5, 1e-4
"""Two batch sizes on one device agree within these (as torch.isclose): only the kernels' blocking differs."""
MIN_SPEED_RATIO = 0.5
"""actcache's step must reach this fraction of the hand-written truncated forward pass's tokens/s."""
OOM_HEADROOM = 256 << 20


@dataclass
class Ctx:
    """What the checks share: the device, the model, a work folder, and the sets made along the way."""

    device: str
    src: Path
    work: Path
    context: int
    rehearse: bool
    sets: dict[str, str] = field(default_factory=dict)
    _model: object = None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def model(self):
        from actcache.inputs.model import ModelSpec, resolve_model

        if self._model is None:
            self._model = resolve_model(ModelSpec(str(self.src)))
        return self._model

    def tokens(self, n_seq: int, seed: int = 0):
        import torch

        vocab = json.loads((self.src / "config.json").read_text())["vocab_size"]
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (n_seq, self.context), generator=g, dtype=torch.int32)

    def step(self, batch_size: int):
        from actcache.extraction.forward import extractor_for

        return extractor_for(self.model(), [HOOK], batch_size=batch_size, device=self.device)


class Failed(AssertionError):
    pass


def require(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)


def max_abs(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def same(a, b, what: str) -> float:
    """max|a - b|, after requiring that ``a`` and ``b`` (same device, other batching) agree within SAME_*."""
    import torch

    require(a.shape == b.shape, f"{what}: shapes {list(a.shape)} and {list(b.shape)}")
    err = max_abs(a, b)
    ok = torch.isclose(a.double(), b.double(), rtol=SAME_RTOL, atol=SAME_ATOL).all()
    require(bool(ok), f"{what}: differ by up to {err:.2e} (beyond atol={SAME_ATOL:g} rtol={SAME_RTOL:g})")
    return err


# -- the checks ---------------------------------------------------------------------------------------------
def check_auto_batch(ctx: Ctx) -> str:

    from actcache.extraction import forward

    step = ctx.step(0)
    (part,) = step.parts
    want = max(1, forward.AUTO_BATCH_TOKENS // ctx.context) if ctx.cuda else forward.CPU_BATCH
    got = part.batch_for(1 << 20, ctx.context)
    require(part.adaptive == ctx.cuda, f"adaptive={part.adaptive} on {part.device}")
    require(got == want, f"automatic batch {got} sequences, expected {want}")
    tokens = ctx.tokens(min(2 * want + 3, 4096))  # two full passes and a short one
    auto = step(tokens)[HOOK]
    fixed = ctx.step(4)(tokens)[HOOK]
    err = same(auto, fixed, "automatic batch vs batch 4")
    require(auto.device.type == "cpu" and (auto.is_pinned() or not ctx.cuda), "output not in pinned host memory")
    return f"{got} seq x {ctx.context} tok per pass; max|auto - batch4| {err:.1e}"


def check_oom_halving(ctx: Ctx) -> str:
    if not ctx.cuda:
        return "skipped: CUDA only"
    import torch

    from actcache.extraction import forward

    dev = torch.device(ctx.device)
    step = ctx.step(0)
    (part,) = step.parts
    tokens = ctx.tokens(2 * part.batch_for(1 << 20, ctx.context))
    reference = ctx.step(4)(tokens)[HOOK]
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(dev).total_memory
    cap = torch.cuda.memory_reserved(dev) + OOM_HEADROOM
    start = part.batch_for(len(tokens), ctx.context)
    torch.cuda.set_per_process_memory_fraction(cap / total, dev)
    try:
        got = step(tokens)[HOOK]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()
    fits = forward._FITS.pop(part._fits_key(ctx.context), None)
    require(fits is not None and fits < start, f"no out-of-memory halving happened under a {cap >> 20} MiB cap")
    err = same(got, reference, "after halving vs batch 4")
    return f"cap {cap >> 20} MiB: {start} -> {fits} seq per pass; max|diff| {err:.1e}"


def check_pinned_shards(ctx: Ctx) -> str:
    if not ctx.cuda:
        return "skipped: CUDA only"
    import torch

    from actcache.format import shard, shardfile

    tokens = ctx.tokens(16)
    step = ctx.step(0)
    width = step.hook_shapes()[HOOK][0]
    specs = {"activations": (torch.float16, (16, ctx.context, width)), "tokens": (torch.int32, tuple(tokens.shape))}
    meta = {"set_id": "gpu-check", "hook": HOOK, "index": "0"}
    ptrs, notes = [], []
    for codec in ("none", "shuffle-zstd"):
        f = shardfile.ShardFile(specs, meta, pinned=True)
        require(f.buffer.is_pinned(), "shard buffer is not pinned")
        ptrs.append(f.buffer.data_ptr())
        f.tensors["tokens"].copy_(tokens)
        step(tokens, into=lambda _h, shape, f=f: f.tensors["activations"])
        acts, toks = f.tensors["activations"].clone(), f.tensors["tokens"].clone()
        payload = shardfile.encode(f, codec=codec, level=3)
        want = shard.encode({"activations": acts, "tokens": toks}, codec=codec, level=3, metadata=meta)
        require(bytes(payload.data) == bytes(want.data), f"pinned shard bytes differ from shard.encode ({codec})")
        payload.release()
        notes.append(f"{codec} ok")
    require(ptrs[0] == ptrs[1], "the second shard did not reuse the pinned buffer")
    return ", ".join(notes) + "; buffer reused"


def extract_on_both(ctx: Ctx, hooks: str, tag: str) -> list[tuple[str, str]]:
    """``hooks`` extracted on the CPU and on the checked device (4 shards each, float32): (cpu url, device url) per
    hook, in the order listed."""
    urls = []
    for i, dev in enumerate(("cpu", ctx.device)):
        out = run_cli(
            "extract",
            f"--model={ctx.src}",
            f"--hook={hooks}",
            f"--store={ctx.work / f'{tag}-{i}'}",
            f"--device={dev}",
            f"--context-size={ctx.context}",
            f"--max-tokens={16 * ctx.context * 4}",
            f"--shard-tokens={16 * ctx.context}",
            "--dtype=float32",
            "--json",
        )
        sets = json.loads(out.stdout)["sets"]
        for s in sets:
            require(s["complete"] and s["shards_computed"] == 4, f"extract --device {dev}: {s}")
        urls.append([s["url"] for s in sets])
    return list(zip(*urls, strict=True))


def diff_within(a: str, b: str) -> float:
    """The worst max|a - b| of two sets, after requiring that `actcache diff` finds them within DIFF_*."""
    res = run_cli("diff", a, b, f"--atol={DIFF_ATOL}", f"--rtol={DIFF_RTOL}", "--json", ok=(0, 1))
    doc = json.loads(res.stdout)
    worst = max((s["max_abs_diff"] for s in doc["shards"]), default=0.0)
    require(res.returncode == 0, f"actcache diff exit {res.returncode}: worst max|a-b| {worst:.2e}")
    return worst


def check_cpu_vs_gpu_diff(ctx: Ctx) -> str:
    ((cpu, dev),) = extract_on_both(ctx, HOOK, "store")
    ctx.sets = {"cpu": cpu}
    worst = diff_within(cpu, dev)
    return f"4 shards within atol={DIFF_ATOL:g} rtol={DIFF_RTOL:g}; worst max|cpu - gpu| {worst:.1e}"


def check_gated_hooks(ctx: Ctx) -> str:
    """The hooks TransformerLens 4 keeps off (inputs/gates.py): their flag set on the device's bridge too."""
    worst = [diff_within(cpu, dev) for cpu, dev in extract_on_both(ctx, GATED, "gated")]
    return f"{GATED}: each within atol={DIFF_ATOL:g} rtol={DIFF_RTOL:g} of the CPU; worst {max(worst):.1e}"


def check_reader_device(ctx: Ctx) -> str:
    import torch

    from actcache.read.dataset import ActivationDataset

    url = ctx.sets.get("cpu")
    require(url is not None, "no set to read (cpu_vs_gpu_diff did not make one)")
    n = 0
    # As stored, then float32 standardised: on CUDA the second crosses as stored and is cast and normalised there.
    for kw in ({}, {"dtype": torch.float32, "normalize": "standardize", "shuffle_buffer": 3000}):
        host = list(ActivationDataset(url, batch_size=1000, with_tokens=True, **kw))
        on_dev = ActivationDataset(url, batch_size=1000, with_tokens=True, device=ctx.device, pin_memory=ctx.cuda, **kw)
        require(not ctx.cuda or not kw or on_dev._late[0] is not None, "float32 batches not cast on the GPU")
        total = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for (acts, toks), (want_acts, want_toks) in zip(on_dev, host, strict=True):
            require(acts.device.type == torch.device(ctx.device).type, f"batch on {acts.device}")
            require(acts.dtype == want_acts.dtype, f"batch {n} in {acts.dtype}, not {want_acts.dtype}")
            total += acts.double().sum()  # used on the consumer's stream, as a trainer would
            same_bits = torch.equal(acts.cpu().view(torch.uint8), want_acts.view(torch.uint8))
            require(same_bits and torch.equal(toks.cpu(), want_toks), f"batch {n} differs ({kw or 'as stored'})")
            n += 1
        want_total = sum(a.double().sum() for a, _ in host)
        require(abs(float(total) - float(want_total)) <= 1e-6 * max(1.0, abs(float(want_total))), "sums differ")
    return f"{n} batches on {ctx.device} (as stored; float32 standardised), each equal to the host batch bit for bit"


def check_tokens_per_s(ctx: Ctx) -> str:
    import torch
    from transformers import AutoModel

    step = ctx.step(0)
    (part,) = step.parts
    batch = part.batch_for(1 << 20, ctx.context)
    tokens = ctx.tokens(4 * batch if ctx.cuda else 2 * batch)
    ref = AutoModel.from_pretrained(ctx.src, attn_implementation="sdpa", num_hidden_layers=6)
    ref.ln_f = torch.nn.Identity()  # blocks.5's output is the input of the final norm
    ref = ref.to(ctx.device).eval()

    def by_hand():
        with torch.inference_mode():
            outs = [
                ref(
                    input_ids=tokens[i : i + batch].to(ctx.device, dtype=torch.long), use_cache=False
                ).last_hidden_state.cpu()
                for i in range(0, len(tokens), batch)
            ]
        return torch.cat(outs)

    def ours():
        return step(tokens)[HOOK]

    def sync():
        if ctx.cuda:
            torch.cuda.synchronize(torch.device(ctx.device))

    same(ours(), by_hand(), "actcache's step vs the hand-written pass")  # also the warm-up
    times = {"ours": [], "hf": []}
    for _ in range(3 if ctx.cuda else 1):
        for name, fn in (("ours", ours), ("hf", by_hand)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    rate = {k: tokens.numel() / min(v) for k, v in times.items()}
    ratio = rate["ours"] / rate["hf"]
    if ctx.cuda:
        require(ratio >= MIN_SPEED_RATIO, f"{rate['ours']:.0f} tok/s is {ratio:.2f}x the truncated HF pass")
    return f"actcache {rate['ours']:,.0f} tok/s, truncated HF {rate['hf']:,.0f} tok/s ({ratio:.2f}x)"


CHECKS: tuple[tuple[str, Callable[[Ctx], str]], ...] = (
    ("auto_batch", check_auto_batch),
    ("oom_halving", check_oom_halving),
    ("pinned_shards", check_pinned_shards),
    ("cpu_vs_gpu_diff", check_cpu_vs_gpu_diff),
    ("reader_device", check_reader_device),
    ("gated_hooks", check_gated_hooks),
    ("tokens_per_s", check_tokens_per_s),
)


def run_cli(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "actcache.cli", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if res.returncode not in ok:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise Failed(f"actcache {args[0]} exit {res.returncode}: {' | '.join(tail)}")
    return res


def run_checks(ctx: Ctx, only: list[str] | None = None) -> list[dict]:
    rows = []
    for name, fn in CHECKS:
        if only and name not in only:
            continue
        t = time.perf_counter()
        try:
            detail, ok = fn(ctx), True
        except Failed as e:
            detail, ok = str(e), False
        except Exception as e:  # a crash is a failed check too; its cause goes to stderr
            traceback.print_exc()
            detail, ok = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], False
        rows.append({"check": name, "ok": ok, "seconds": round(time.perf_counter() - t, 1), "detail": detail})
        print(f"[gpu_check] {name}: {'ok' if ok else 'FAILED'} ({rows[-1]['seconds']} s)", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'check':16} {'result':6} {'s':>6}  detail")
    for r in rows:
        print(f"{r['check']:16} {'ok' if r['ok'] else 'FAIL':6} {r['seconds']:>6}  {r['detail']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the CUDA device to check (default cuda)")
    ap.add_argument("--rehearse", action="store_true", help="run the steps on the CPU with a tiny model")
    ap.add_argument("--only", default="", help=f"comma-separated checks of {', '.join(n for n, _ in CHECKS)}")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - {n for n, _ in CHECKS}
    if unknown:
        ap.error(f"unknown checks {sorted(unknown)}")
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing checked", file=sys.stderr)
        return NO_CUDA
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from bench.run import saved_gpt2

    if args.rehearse:
        device, context = "cpu", 32
        src = saved_gpt2("gpt2-tiny-6l", n_embd=64, n_layer=6, n_head=4, vocab_size=4096)
        header = "gpu_check REHEARSAL on the CPU (tiny model; CUDA-only checks skipped)"
    else:
        device, context = args.device, 512
        src = saved_gpt2("gpt2-small-random", n_embd=768, n_layer=12, n_head=12, vocab_size=50257)
        header = f"gpu_check on {torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="actcache-gpu-check-") as work:
        rows = run_checks(Ctx(device, src, Path(work), context, args.rehearse), only)
    print_table(rows, f"{header}; {time.perf_counter() - t:.0f} s")
    if args.out:
        with contextlib.suppress(OSError):
            Path(args.out).write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
