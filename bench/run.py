"""actcache's benchmark: every method side by side in ONE process, round-robin, medians.

    .venv/bin/python bench/run.py --update-results   # full run (over 1 h on 2 CPU cores): rewrites bench/results.json
    .venv/bin/python bench/run.py --smoke            # tiny model, one rep of everything (~1 min; what CI runs)
    .venv/bin/python bench/run.py --only speed,compression --out /tmp/speed.json
    .venv/bin/python bench/run.py --only gpu         # every CUDA path checked on one GPU (bench/gpu_check.py)

Only --update-results rewrites the committed bench/results.json; otherwise the results go to --out (default: a
new temporary file, named at the start and the end). Progress goes to stderr: each section as it starts, each
method's time in each round.

Model: GPT-2-small shape (12 layers, d=768, vocab 50257) with random weights, built once in the actcache
cache dir; hook blocks.5.hook_resid_post. Methods (tokens/s, ratio to (d)):
  (a)    classic: TransformerLens model (the bridge), full forward, torch forward hook on block 5, no_grad,
         clone, cat.  (a-hf): the same on the bare HF GPT2LMHeadModel, for reference.
  (b)    unfiltered bridge.run_with_cache.
  (c)    actcache's extraction step alone (the engine it picks; hf-sdpa for this hook).
  (c-br) actcache's extraction step on the bridge engine (what every non-residual hook gets).
  (d)    the practical limit: bare HF GPT2Model with blocks 0..5 only, final norm dropped, sdpa, inference_mode.
  (e)    actcache's whole Prefect flow per token (tokenize + extract + compress + write a local store; 3 shards of
         8192 tokens), minus an empty flow run measured in the same rounds (Prefect's per-run cost, (e0)).
Speed numbers belong here, never in tests: the machine is shared, so only ratios within one run mean much.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
sys.path.insert(0, str(ROOT))  # flows/ and tasks/ are top-level packages of the checkout

HOOK = "blocks.5.hook_resid_post"
LAYER = 5


# -- set-up --------------------------------------------------------------------------------------
def saved_gpt2(name: str, **shape) -> Path:
    """A GPT-2 of this shape with random weights (seed 0) and the demo's trained BPE tokenizer, saved once in the
    cache (``vocab_size`` defaults to the tokenizer's)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from actcache.inputs import demo
    from actcache.inputs.fingerprint import cache_dir

    out = cache_dir() / "bench" / name
    if (out / "config.json").exists():
        return out
    tok = demo.train_tokenizer(demo.corpus_lines())
    torch.manual_seed(0)
    cfg = GPT2Config(n_positions=1024, bos_token_id=0, eos_token_id=0, **{"vocab_size": len(tok), **shape})
    model = AutoModelForCausalLM.from_config(cfg)
    tmp = Path(tempfile.mkdtemp(dir=out.parent.mkdir(parents=True, exist_ok=True) or out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def build_model(smoke: bool) -> Path:
    """GPT-2-small shape with random weights (or a tiny GPT-2 for --smoke), with a trained BPE tokenizer."""
    if smoke:
        return saved_gpt2("gpt2-tiny-6l", n_embd=64, n_layer=6, n_head=4, vocab_size=4096)
    return saved_gpt2("gpt2-small-random", n_embd=768, n_layer=12, n_head=12, vocab_size=50257)


def corpus(work: Path) -> Path:
    from actcache.inputs import demo

    path = work / "corpus.txt"
    if not path.exists():
        path.write_text("\n".join(demo.corpus_lines()) + "\n", encoding="utf-8")
    return path


def rss_mb() -> float:
    """Peak resident set of this process in MB (VmHWM: unlike ru_maxrss it does not start at the parent's peak)."""
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_SECTION = ["bench"]


def progress(line: str) -> None:
    """One line of progress on stderr, under the section that runs (stdout keeps the table)."""
    print(f"[bench] {_SECTION[0]}: {line}", file=sys.stderr, flush=True)


def round_robin(methods: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each method: warm-up, then ``reps`` rounds, the order rotated every round."""
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            methods[n]()
            times[n].append(time.perf_counter() - t)
            progress(f"round {r + 1}/{reps} {n}: {times[n][-1]:.2f} s")
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def empty_flow():
    from prefect import flow

    @flow(name="bench-empty")
    def empty() -> int:
        return 0

    return empty


# -- the methods -----------------------------------------------------------------------------------
class Methods:
    """Every way to get blocks.5.hook_resid_post for ``tokens``, each returning the activations."""

    def __init__(self, src: Path, device: str, batch: int):
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        from actcache.extraction.forward import Extractor, extractor_for
        from actcache.inputs.model import ModelSpec, load_bridge, resolve_model

        self.torch, self.batch, self.device = torch, batch, device
        self.model = resolve_model(ModelSpec(str(src)))
        self._bridge_loader = lambda: load_bridge(self.model, device=device)
        self._hf_lm = lambda: AutoModelForCausalLM.from_pretrained(src).to(device).eval()
        self._extractor_for, self._Extractor, self._AutoModel = extractor_for, Extractor, AutoModel
        self.src = src
        self.cache: dict[str, object] = {}

    def _get(self, name, make):
        if name not in self.cache:
            self.cache[name] = make()
        return self.cache[name]

    def sync(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def batches(self, tokens):
        return [
            tokens[i : i + self.batch].to(self.device, dtype=self.torch.long) for i in range(0, len(tokens), self.batch)
        ]

    def a(self, tokens):
        bridge = self._get("bridge", self._bridge_loader)
        return self._classic(bridge, bridge.blocks[LAYER], tokens)

    def a_hf(self, tokens):
        lm = self._get("hf_lm", self._hf_lm)
        return self._classic(lm, lm.transformer.h[LAYER], tokens)

    def _classic(self, model, block, tokens):
        torch, outs = self.torch, []
        handle = block.register_forward_hook(
            lambda _m, _i, out: outs.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        )
        try:
            with torch.no_grad():
                for b in self.batches(tokens):
                    model(b)
        finally:
            handle.remove()
        self.sync()
        return torch.cat(outs).cpu()

    def b(self, tokens):
        bridge = self._get("bridge", self._bridge_loader)
        outs = []
        with self.torch.inference_mode():
            for b in self.batches(tokens):
                _, cache = bridge.run_with_cache(b)
                outs.append(cache[HOOK])
                del cache
        self.sync()
        return self.torch.cat(outs).cpu()

    def c(self, tokens):
        step = self._get(
            "c", lambda: self._extractor_for(self.model, [HOOK], batch_size=self.batch, device=self.device)
        )
        return step(tokens)[HOOK]

    def c_br(self, tokens):
        bridge = self._get("bridge", self._bridge_loader)
        step = self._get("c_br", lambda: self._Extractor(bridge, [HOOK], batch_size=self.batch))
        return step(tokens)[HOOK]

    def d(self, tokens):
        def make():
            m = self._AutoModel.from_pretrained(self.src, attn_implementation="sdpa", num_hidden_layers=LAYER + 1)
            m.ln_f = self.torch.nn.Identity()
            return m.to(self.device).eval()

        m = self._get("d", make)
        with self.torch.inference_mode():
            outs = [m(input_ids=b, use_cache=False).last_hidden_state for b in self.batches(tokens)]
        self.sync()
        return self.torch.cat(outs).cpu()


SPEED_METHODS = ("a", "a_hf", "b", "c", "c_br", "d")


def random_tokens(n_seq: int, ctx: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_seq, ctx), generator=g, dtype=torch.int32)


def flow_config(
    src: Path, work: Path, batch: int, ctx: int, shard_seqs: int, n_shards: int, device: str, hook: str = HOOK, **extra
):
    from actcache.config import ExtractConfig

    store = Path(tempfile.mkdtemp(prefix="store-", dir=work))
    return ExtractConfig(
        model=str(src),
        hook=hook,
        dataset=str(corpus(work)),
        context_size=ctx,
        shard_tokens=shard_seqs * ctx,
        max_tokens=n_shards * shard_seqs * ctx,
        batch_size=batch,
        store=str(store),
        device=device,
        **extra,
    )


def run_flow(cfg) -> float:
    from actcache.flows.extract import extract_activations

    t = time.perf_counter()
    extract_activations(cfg)
    dt = time.perf_counter() - t
    shutil.rmtree(cfg.store, ignore_errors=True)
    return dt


def speed(src: Path, work: Path, device: str, shapes, reps: int, smoke: bool) -> dict:
    """(a)-(e) at each batch shape, round-robin in this process; correctness of (c) and (e) checked."""
    # The larger shape costs ~4.5x per round: fewer rounds there keep the whole run near 15 minutes.
    return {
        f"{batch}x{ctx}": speed_one(src, work, device, batch, ctx, reps if i == 0 else max(reps - 2, 1), smoke)
        for i, (batch, ctx) in enumerate(shapes)
    }


def speed_one(src: Path, work: Path, device: str, batch: int, ctx: int, reps: int, smoke: bool) -> dict:
    import torch

    m = Methods(src, device, batch)
    vocab = m.model.config.vocab_size
    big = random_tokens(2 * batch, ctx, vocab)  # 2 batches for the fast methods
    small = big[:batch]  # 1 batch for the slow baselines
    n_tok = {
        "a": small.numel(),
        "a_hf": small.numel(),
        "b": small.numel(),
        "c": big.numel(),
        "c_br": big.numel(),
        "d": big.numel(),
    }
    calls = {k: (lambda k=k: getattr(m, k)(small if n_tok[k] == small.numel() else big)) for k in SPEED_METHODS}
    # 8192-token shards: what the flow costs per shard (task runs, events, a record) is then ~3% of a shard's
    # forward pass on this CPU, and 32x less again at the default shard size (2^18).
    shard_seqs, n_shards = max(1, 8192 // ctx), 2 if smoke else 3
    e_tokens = shard_seqs * n_shards * ctx
    calls["e"] = lambda: run_flow(flow_config(src, work, batch, ctx, shard_seqs, n_shards, device))
    calls["e0"] = lambda: empty_flow()()
    times = round_robin(calls, reps)
    # (c) and (d) run the same arithmetic (bit-equal outputs, checked below), so their ratio is mostly the
    # machine's drift between rounds: many short back-to-back pairs, median of the per-pair ratios.
    pairs = round_robin({"c": calls["c"], "d": calls["d"]}, 4 * reps)
    c_over_d_paired = median([d / c for c, d in zip(pairs["c"], pairs["d"], strict=True)])
    tps = {k: n_tok[k] / median(times[k]) for k in SPEED_METHODS}
    e_sec = median(times["e"]) - median(times["e0"])
    tps["e"] = e_tokens / e_sec
    tps["e_raw"] = e_tokens / median(times["e"])
    # Correctness, on the same tokens: (c) against the bridge, (d) and the stored set.
    ref_bridge = m.c_br(big)
    got = m.c(big)
    ref_d = m.d(big)
    check = {
        "c_vs_bridge_max_abs": float((got - ref_bridge).abs().max()),
        "c_vs_bridge_allclose": bool(torch.allclose(got, ref_bridge, rtol=1e-5, atol=1e-5)),
        "c_vs_bridge_fp16_mismatch_frac": float((got.half() != ref_bridge.half()).float().mean()),
        "c_equals_d": bool(torch.equal(got, ref_d)),
        "c_vs_unfiltered_run_with_cache_max_abs": float((m.c(small) - m.b(small)).abs().max()),
    }
    check["e_equals_c"] = stored_equals_extractor(src, work, batch, ctx, device, m)
    cfg = m.model.config
    d, n_layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    per_block = 12 * d * d + 2 * ctx * d  # multiply-adds per token: qkv + out + 4d MLP, then QK^T and AV
    return {
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "vs_d": {k: round(v / tps["d"], 3) for k, v in tps.items()},
        "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "e0_empty_flow_s": round(median(times["e0"]), 3),
        "c_over_d_paired": round(c_over_d_paired, 3),
        "c_d_pairs_seconds": {k: [round(x, 4) for x in v] for k, v in pairs.items()},
        # (a) runs every block and the unembedding, (d) blocks 0..5: the bound on (c)/(a) at (d)'s efficiency.
        "a_over_d_matmul_flops": round((n_layers * per_block + d * vocab) / ((LAYER + 1) * per_block), 2),
        "e_tokens_per_run": e_tokens,
        "check": check,
    }


def stored_equals_extractor(src, work, batch, ctx, device, m) -> bool:
    """The flow's stored float16 activations equal the extraction step's output on the stored tokens."""
    from actcache.flows.extract import extract_activations
    from actcache.read.reader import open_set

    cfg = flow_config(src, work, batch, ctx, batch, 1, device)
    (url,) = extract_activations(cfg)
    s = next(iter(open_set(url)))
    ok = bool(s.activations.equal(m.c(s.tokens).half()))
    shutil.rmtree(cfg.store, ignore_errors=True)
    return ok


# -- peak RSS per method, each in its own process ---------------------------------------------------
def rss_child(method: str, src: Path, work: Path, device: str, batch: int, ctx: int) -> None:
    quiet_prefect()
    base = rss_mb()
    m = Methods(src, device, batch)
    tokens = random_tokens(2 * batch, ctx, m.model.config.vocab_size)
    if method == "e":
        empty_flow()()
        run_flow(flow_config(src, work, batch, ctx, 2 * batch, 2, device))
    else:
        for _ in range(2):
            getattr(m, method)(tokens)
    print(json.dumps({"peak_rss_mb": round(rss_mb(), 1), "after_imports_mb": round(base, 1)}))


def child(args: list[str], timeout: float = 900, env: dict | None = None, pythonpath: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath or str(ROOT), **(env or {})}
    p = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(ROOT),
    )
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def peak_rss(src: Path, work: Path, device: str, shapes) -> dict:
    return {
        f"{b}x{c}": {
            k: child(
                ["--rss-child", k, "--src", str(src), "--work", str(work), "--device", device, "--shape", f"{b}x{c}"]
            )
            for k in (*SPEED_METHODS, "e")
        }
        for b, c in shapes
    }


# -- several hooks in one pass ---------------------------------------------------------------------
def several_hooks(src: Path, device: str, batch: int, ctx: int, reps: int, n_layers: int) -> dict:
    from actcache.extraction.forward import extractor_for
    from actcache.inputs.model import ModelSpec, load_bridge, resolve_model

    model = resolve_model(ModelSpec(str(src)))
    tokens = random_tokens(2 * batch, ctx, model.config.vocab_size, seed=3)
    layers = [n_layers * k // 4 + n_layers // 4 - 1 for k in range(4)]  # 2,5,8,11 for 12 layers
    bridge = load_bridge(model, device=device)
    out = {}
    for label, fmt in (
        ("resid_post (hf-sdpa)", "blocks.{}.hook_resid_post"),
        ("attn.hook_z (bridge)", "blocks.{}.attn.hook_z"),
    ):
        hooks = [fmt.format(layer) for layer in layers]
        together = extractor_for(model, hooks, batch_size=batch, device=device, bridge=bridge)
        singles = [extractor_for(model, [h], batch_size=batch, device=device, bridge=bridge) for h in hooks]
        times = round_robin(
            {"one_pass": lambda t=together: t(tokens), "four_runs": lambda ss=singles: [s(tokens) for s in ss]}, reps
        )
        # Median of per-round ratios: the machine's drift between rounds cancels within a round.
        r = median([a / b for a, b in zip(times["one_pass"], times["four_runs"], strict=True)])
        ideal = (max(layers) + 1) / sum(x + 1 for x in layers)
        out[label] = {
            "hooks": hooks,
            "one_pass_s": round(median(times["one_pass"]), 3),
            "four_runs_s": round(median(times["four_runs"]), 3),
            "ratio": round(r, 3),
            "blocks_ratio_ideal": round(ideal, 3),
        }
    return out


# -- compression -----------------------------------------------------------------------------------
def compression(src: Path, device: str, batch: int, ctx: int, reps: int) -> dict:
    import torch

    from actcache.extraction.forward import extractor_for
    from actcache.format import shard
    from actcache.inputs.model import ModelSpec, resolve_model

    model = resolve_model(ModelSpec(str(src)))
    tokens = random_tokens(2 * batch, ctx, model.config.vocab_size, seed=4)
    acts = extractor_for(model, [HOOK], batch_size=batch, device=device)(tokens)[HOOK]
    n_tok = tokens.numel()
    rows = []
    for dtype in ("float16", "bfloat16"):
        cast = acts.to(getattr(torch, dtype))
        tensors = {"activations": cast, "tokens": tokens}
        raw_len = len(shard.encode(tensors).data)
        for codec, lvl in (("none", 0), ("zstd", 1), ("zstd", 3), ("shuffle-zstd", 1), ("shuffle-zstd", 3)):
            times = round_robin({"enc": lambda t=tensors, c=codec, lv=lvl: shard.encode(t, codec=c, level=lv)}, reps)
            data = shard.encode(tensors, codec=codec, level=lvl).data
            dec = round_robin({"dec": lambda d=data, c=codec: shard.decode(d, codec=c)}, reps)
            assert shard.decode(data, codec=codec)["activations"].equal(cast)
            rows.append(
                {
                    "dtype": dtype,
                    "codec": f"{codec}-{lvl}" if lvl else codec,
                    "bytes_per_token": round(len(data) / n_tok, 1),
                    "ratio": round(raw_len / len(data), 3),
                    "encode_MB_s": round(raw_len / median(times["enc"]) / 1e6, 1),
                    "decode_MB_s": round(raw_len / median(dec["dec"]) / 1e6, 1),
                }
            )
    return {"tokens": n_tok, "note": "random-weight model: real activations may compress differently", "rows": rows}


# -- normalisation statistics: their cost beside the forward pass ----------------------------------------
def stats_cost(src: Path, device: str, batch: int, ctx: int, reps: int) -> dict:
    """The extraction step (c) alone vs with the previous shard's moments (``moments.of``, what the compress
    stage adds) computed in a thread beside it, round-robin; and the moments' own time per token."""
    import threading

    import torch

    from actcache.extraction.forward import extractor_for
    from actcache.format import moments
    from actcache.inputs.model import ModelSpec, resolve_model

    model = resolve_model(ModelSpec(str(src)))
    step = extractor_for(model, [HOOK], batch_size=batch, device=device)
    tokens = random_tokens(4 * batch, ctx, model.config.vocab_size, seed=5)  # a "shard" of 4 batches
    previous = step(tokens)[HOOK].to(torch.float16)  # the storage-dtype tensor compress hands to moments.of

    def beside() -> None:
        t = threading.Thread(target=moments.of, args=(previous,))
        t.start()
        step(tokens)
        t.join()

    times = round_robin({"forward": lambda: step(tokens), "forward_with_stats": beside}, reps)
    alone = round_robin({"moments": lambda: moments.of(previous)}, reps)
    paired = [w / f for f, w in zip(times["forward"], times["forward_with_stats"], strict=True)]
    # CPU seconds, which other processes' load barely moves: what the moments take from the forward's cores.
    cpu_forward, cpu_moments = [], []
    for _ in range(reps):
        t = time.process_time()
        step(tokens)
        cpu_forward.append(time.process_time() - t)
        t = time.thread_time()
        moments.of(previous)
        cpu_moments.append(time.thread_time() - t)
    n = tokens.numel()
    return {
        "tokens_per_shard": n,
        "d": previous.shape[-1],
        "cpu_moments_vs_cpu_forward": round(median(cpu_moments) / median(cpu_forward), 5),
        "forward_s": round(median(times["forward"]), 4),
        "forward_with_stats_s": round(median(times["forward_with_stats"]), 4),
        "slowdown_median_of_pairs": round(median(paired) - 1, 4),
        "moments_alone_us_per_token": round(median(alone["moments"]) / n * 1e6, 3),
        "moments_alone_vs_forward": round(median(alone["moments"]) / median(times["forward"]), 4),
    }


# -- per-shard overhead: what the flow adds around the forward pass -------------------------------------
class _Stub:
    """Stands in for the extractor: sleeps like a GPU forward pass at ``rate`` tokens/s (the GIL is released,
    as while waiting on a CUDA stream), returns zeros of the model's width, and stamps when each call starts."""

    def __init__(self, hooks, rate: float | None, starts: list[float], width: int):
        self.hooks, self.rate, self.starts, self.width = hooks, rate, starts, width

    def __call__(self, tokens, into=None, finite=None):
        import torch

        self.starts.append(time.perf_counter())
        if self.rate:
            time.sleep(tokens.numel() / self.rate)
        shape = (*tokens.shape, self.width)
        return {h: into(h, shape).zero_() if into else torch.zeros(shape) for h in self.hooks}


@contextlib.contextmanager
def stub_forward(rate: float | None, starts: list[float]):
    import actcache.extraction.forward as ax  # Plan.extractor imports extractor_for from here when it is called

    real = ax.extractor_for
    ax.extractor_for = lambda model, hooks, **k: _Stub(hooks, rate, starts, model.d_model)  # resid hooks only
    try:
        yield
    finally:
        ax.extractor_for = real


def big_corpus(work: Path, repeat: int) -> Path:
    path = work / f"corpus-x{repeat}.txt"
    if not path.exists():
        path.write_text(corpus(work).read_text(encoding="utf-8") * repeat, encoding="utf-8")
    return path


def pipeline_overhead(src: Path, work: Path, counts: tuple[int, int]) -> dict:
    """Per-shard cost of everything but the forward pass (Prefect task runs, hand-offs, encode, write, record):
    the real flow with a forward pass that takes no time, so the flow's own cost is all there is."""
    secs = {}
    for n in (counts[0], *counts):  # the first run is a warm-up: Prefect's server, model config, tokenizer
        with stub_forward(None, []):
            # Fresh store each time: the difference between the two counts is the cost of one more shard.
            secs[n] = run_flow(flow_config(src, work, 1, 32, 1, n, "cpu", hook="blocks.0.hook_resid_post"))
    per_shard = (secs[counts[1]] - secs[counts[0]]) / (counts[1] - counts[0])
    return {"flow_seconds": {str(k): round(v, 2) for k, v in secs.items()}, "per_shard_ms": round(1000 * per_shard, 1)}


def gpu_rate_overhead(src: Path, work: Path, rate: float, sizes: dict[int, int]) -> dict:
    """How long the forward pass waits on the flow per shard at a GPU-class ``rate`` (tokens/s).

    The extractor is stubbed by one that sleeps for shard_tokens / rate; the gap between the starts of
    consecutive forward passes minus that sleep is what the flow adds on the forward pass's path
    (the extract task run, submitting compress/upload, a full in-flight window, loading the token shard).
    """
    ctx = 128
    need = max(n * t for t, n in sizes.items())
    cfg_corpus = big_corpus(work, max(1, -(-need // 90_000)))  # the demo corpus holds ~100k tokens
    out = {}
    for shard_tokens, n in sizes.items():
        starts: list[float] = []
        cfg = flow_config(src, work, 8, ctx, shard_tokens // ctx, n, "cpu", hook="blocks.0.hook_resid_post")
        cfg = cfg.replace(dataset=str(cfg_corpus))
        with stub_forward(rate, starts):
            run_flow(cfg)
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        t_fwd = shard_tokens / rate
        over = median(gaps) - t_fwd
        out[str(shard_tokens)] = {
            "shards": n,
            "forward_s": round(t_fwd, 3),
            "median_gap_s": round(median(gaps), 4),
            "overhead_ms": round(1000 * over, 1),
            "overhead_percent": round(100 * over / t_fwd, 2),
        }
    return {"rate_tokens_per_s": rate, "by_shard_tokens": out}


# -- warm rerun of a complete 1000-shard set; cold start ---------------------------------------------
def make_complete_set(src: Path, work: Path, n: int) -> dict:
    """A complete set of ``n`` (small) shards written the way the flow writes them, without running n tasks."""
    import torch

    from actcache.extraction.plan import make_plan
    from actcache.extraction.stages import write_manifest
    from actcache.format import layout, records, shard

    cfg = flow_config(src, work, 1, 32, 1, n, "cpu", hook="blocks.0.hook_resid_post")
    plan = make_plan(cfg, load_model=False)
    (s,) = plan.sets
    store = plan.store
    for w in plan.shards:
        enc = shard.encode(
            {
                "activations": torch.zeros(w.n_seq, 32, 8, dtype=torch.float16),
                "tokens": torch.zeros(w.n_seq, 32, dtype=torch.int32),
            }
        )
        rel = layout.shard_file(w.index, "none")
        store.write_bytes(f"{s.set_id}/{rel}", enc.data)
        records.write_record(
            store,
            s.set_id,
            records.Record(w.index, rel, w.n_seq, w.n_seq * 32, enc.sha256, len(enc.data), {"hook_shape": [8]}),
        )
    write_manifest(plan)
    return {
        "store": cfg.store,
        "config": {
            k: getattr(cfg, k)
            for k in (
                "model",
                "hook",
                "dataset",
                "context_size",
                "shard_tokens",
                "max_tokens",
                "batch_size",
                "store",
                "device",
            )
        },
    }


def warm_child(config_json: str) -> None:
    t0 = time.perf_counter()
    quiet_prefect()
    import transformers  # noqa: F401  (a start-up cost: make_plan reads the model's config with it)

    from actcache.config import ExtractConfig
    from actcache.extraction import forward
    from actcache.flows.extract import extract_activations
    from actcache.inputs import bridge

    t_imp = time.perf_counter()
    empty_flow()()
    t_prefect = time.perf_counter()
    empty_flow()()
    t_empty = time.perf_counter()
    cfg = ExtractConfig(**json.loads(config_json))
    from actcache.extraction.plan import make_plan

    plan = make_plan(cfg)  # what `actcache extract` does before starting the flow
    t_plan = time.perf_counter()
    extract_activations(cfg)
    t_flow = time.perf_counter()
    empty = t_empty - t_prefect
    print(
        json.dumps(
            {
                "imports_s": round(t_imp - t0, 2),
                "prefect_start_s": round(t_prefect - t_imp, 2),
                "empty_flow_run_s": round(empty, 2),
                "make_plan_s": round(t_plan - t_empty, 2),
                "warm_rerun_flow_s": round(t_flow - t_plan, 2),
                "beyond_startup_s": round(t_flow - t_empty - empty, 2),
                "shards_done": plan.n_done,
                "shards_missing": len(plan.missing),
                "models_loaded": len(bridge._LOADED) + len(forward._HF),
            }
        )
    )


def warm_in_process(config: dict) -> dict:
    from actcache.config import ExtractConfig
    from actcache.extraction import forward
    from actcache.extraction.plan import make_plan
    from actcache.flows.extract import extract_activations
    from actcache.inputs import bridge

    bridge._LOADED.clear()
    forward._HF.clear()
    cfg = ExtractConfig(**config)
    t = time.perf_counter()
    plan = make_plan(cfg)
    extract_activations(cfg)
    return {
        "make_plan_and_flow_s": round(time.perf_counter() - t, 2),
        "shards_done": plan.n_done,
        "shards_missing": len(plan.missing),
        "models_loaded": len(bridge._LOADED) + len(forward._HF),
    }


def cold_child(policy: str, store: str) -> None:
    """`actcache extract` on the demo (2048 tokens) in this fresh process, with the temporary server launched
    first thing ("early", killed unused when the plan finds nothing to do) or only once the plan finds work
    ("late", what the CLI does). The parent times the whole process, exit included."""
    quiet_prefect()
    from actcache.cli import app as cli
    from actcache.orchestration import tempserver

    if policy == "early":
        tempserver.start()
    code = cli.main(["extract", "--max-tokens", "2048", "--shard-tokens", "2048", "--store", store])
    print(json.dumps({"exit": code, "server_started": tempserver._SERVER is not None}))


def cold_start(work: Path, reps: int) -> dict:
    """Cold start of `actcache extract` when the set is complete and when there is work, for both server policies,
    side by side with `python -c "import actcache"` (the floor: interpreter and package import)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}

    def wall(argv: list[str]) -> float:
        t = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, cwd=str(work))
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-500:])
        return time.perf_counter() - t

    me = [sys.executable, str(Path(__file__).resolve()), "--cold-child"]
    complete = str(work / "cold-complete")
    wall([*me, "late", complete])  # makes the complete set (and the demo model/corpus, once per machine)
    times: dict[str, list[float]] = {}
    for r in range(reps):  # round-robin, rotated: machine drift hits every variant alike
        variants = [
            ("import_actcache", [sys.executable, "-c", "import actcache"]),
            *[(f"complete_{p}", [*me, p, complete]) for p in ("late", "early")],
            *[(f"work_{p}", [*me, p, str(work / f"cold-{p}-{r}")]) for p in ("late", "early")],
        ]
        for name, argv in variants[r % len(variants) :] + variants[: r % len(variants)]:
            times.setdefault(name, []).append(wall(argv))
    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    floor = med["import_actcache"]
    return {
        "wall_s_median": med,
        "rounds": reps,
        "complete_cli_vs_import_actcache": round(med["complete_late"] / floor, 1),
        "complete_early_over_late": round(med["complete_early"] / med["complete_late"], 2),
        "work_early_over_late": round(med["work_early"] / med["work_late"], 2),
        "all_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
    }


def rss_growth(src: Path, work: Path, device: str, ctx: int, shard_seqs: int, n_small: int) -> dict:
    """Peak RSS of the whole flow at max_tokens N and 10N (separate processes)."""
    out = {}
    for n in (n_small, 10 * n_small):
        out[str(n * shard_seqs * ctx)] = child(
            ["--flow-rss-child", str(src), str(work), device, str(ctx), str(shard_seqs), str(n)]
        )
    a, b = (v.get("peak_rss_mb") for v in out.values())
    return {
        "peak_rss_mb_by_max_tokens": out,
        "growth_percent": round(100 * (b - a) / a, 1) if a and b else None,
        "hook": "blocks.0.hook_resid_post",
    }


def flow_rss_child(src: str, work: str, device: str, ctx: str, shard_seqs: str, n: str) -> None:
    quiet_prefect()
    empty_flow()()
    cfg = flow_config(
        Path(src), Path(work), 8, int(ctx), int(shard_seqs), int(n), device, hook="blocks.0.hook_resid_post"
    )
    t = time.perf_counter()
    run_flow(cfg)
    print(json.dumps({"peak_rss_mb": round(rss_mb(), 1), "seconds": round(time.perf_counter() - t, 2)}))


# -- memory: peak RSS against shard size at real widths -------------------------------------------------
MEMORY_WIDTHS = (1024, 4096)
# Tokens per shard at each width: 32, 64 and 128 MiB of float16 activations.
MEMORY_SHARD_MIB = (32, 64, 128)
# forward: one real block before the hook (CPU speed: each shard is written long before the next is full).
# fast: the hook is block 0's input, so the pass is only the embedding: the next shard fills faster than the
# last one is written, and the in-flight window (flows/extract.py IN_FLIGHT) is as full as it gets, as at GPU speed.
MEMORY_REGIMES = {"forward": ("blocks.0.hook_resid_post", 2), "fast": ("blocks.0.hook_resid_pre", 4)}


def build_wide_model(width: int) -> Path:
    """One GPT-2 block of width ``width`` (MLP width 1024 whatever the width, to keep the forward pass short: its
    compute is not what this measures), random weights, the demo's 512-token BPE tokenizer."""
    return saved_gpt2(f"gpt2-w{width}-1l-mlp1024", n_embd=width, n_layer=1, n_head=width // 64, n_inner=1024)


def memory_child(spec_json: str) -> None:
    """One extraction in this process (from the source tree ``spec['tree']`` if given): its peak RSS."""
    spec = json.loads(spec_json)
    if spec.get("tree"):
        sys.path.insert(0, spec["tree"])  # before anything imports actcache: measure that tree's code
    quiet_prefect()
    import actcache

    load = os.getloadavg()[0]
    cfg = flow_config(
        Path(spec["src"]),
        Path(spec["work"]),
        8,
        spec["ctx"],
        spec["shard_tokens"] // spec["ctx"],
        spec["shards"],
        "cpu",
        hook=spec["hook"],
        dtype=spec["dtype"],
        codec=spec["codec"],
        codec_level=1,
    )
    need = spec["shard_tokens"] * spec["shards"]
    cfg = cfg.replace(dataset=str(big_corpus(Path(spec["work"]), max(1, -(-need // 90_000)))))
    from actcache.flows.extract import extract_activations

    t = time.perf_counter()
    extract_activations(cfg)
    seconds = time.perf_counter() - t
    stored = sorted(Path(cfg.store).glob("*/shards/000000.*"))
    print(
        json.dumps(
            {
                "peak_rss_mb": round(rss_mb(), 1),
                "stored_shard_bytes": stored[0].stat().st_size,
                "seconds": round(seconds, 1),
                "load_avg": [round(load, 1), round(os.getloadavg()[0], 1)],
                "actcache": str(Path(actcache.__file__).parent.parent),
            }
        )
    )
    shutil.rmtree(cfg.store, ignore_errors=True)


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y on x."""
    if len(points) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return round(sum((x - mx) * (y - my) for x, y in points) / var, 2) if var else None


def source_tree(ref: str, work: Path) -> Path:
    """The checkout at git ``ref`` as plain files (git archive: the repository's state is not touched)."""
    out = work / f"tree-{ref.replace('/', '_')}"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def memory(work: Path, widths, shard_mib, regimes, codecs, before: str | None) -> dict:
    """Peak RSS of an extraction process (own process each) against its shard size, and the slope per stored
    shard byte, for this checkout ("after") and, with ``before``, the checkout at that git ref."""
    from actcache.orchestration import tempserver

    trees = {"after": None}
    if before:
        trees = {"before": str(source_tree(before, work)), **trees}
    server = tempserver.TemporaryServer()  # one Prefect server for every child: no start-up per process
    env_url = server.wait(180)
    out: dict = {"ctx": 128, "dtype": "float16", "before_ref": before, "runs": {}}
    try:
        for width in widths:
            src = build_wide_model(width)
            for regime in regimes:
                hook, shards = MEMORY_REGIMES[regime]
                for codec in codecs:
                    for version, tree in trees.items():
                        points, rows = [], {}
                        for mib in shard_mib:
                            tokens = (mib << 20) // (2 * width) // 128 * 128
                            spec = {
                                "src": str(src),
                                "work": str(work),
                                "ctx": 128,
                                "shard_tokens": tokens,
                                "shards": shards,
                                "hook": hook,
                                "dtype": "float16",
                                "codec": codec,
                                "tree": tree,
                            }
                            r = child(
                                ["--memory-child", json.dumps(spec)], env={"PREFECT_API_URL": env_url}, pythonpath=tree
                            )
                            rows[str(tokens)] = r
                            if "peak_rss_mb" in r:
                                points.append((r["stored_shard_bytes"] / 2**20, r["peak_rss_mb"]))
                            print(
                                f"[memory] w={width} {regime} {codec} {version} {tokens} tokens: {r}",
                                file=sys.stderr,
                                flush=True,
                            )
                        out["runs"][f"w{width}/{regime}/{codec}/{version}"] = {
                            "hook": hook,
                            "shards_per_run": shards,
                            "by_shard_tokens": rows,
                            "slope_rss_per_stored_byte": slope(points),
                        }
    finally:
        server.stop()
    return out


# -- reading a set back for training (issue 10) ----------------------------------------------------------
def drain(items) -> None:
    """Run through ``items``, keeping none of them."""
    for _ in items:
        pass


def reader(work: Path, smoke: bool, reps: int) -> dict:
    """A d=768 float16 set read back every way, round-robin in this process with the page cache warm: GB/s of
    stored activation bytes per epoch, and the median per-round ratio to the floor (plain safetensors load +
    cast to the batch dtype). Then S3 against an independent client, and peak RSS against the set's size."""
    import torch
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from actcache.format import shard
    from actcache.read.dataset import ActivationDataset
    from actcache.read.reader import open_set

    sys.path.insert(0, str(ROOT / "tests"))
    import setwriter

    d, ctx, seqs, n = (64, 32, 16, 4) if smoke else (768, 128, 512, 8)  # full: 8 shards of 65,536 tokens, 768 MB
    batch, buffer = (64, 256) if smoke else (4096, 1 << 17)
    root = work / "reader"
    url = setwriter.write_set(root, shards=n, seqs=seqs, ctx=ctx, d=d, with_stats=True)
    zurl = setwriter.write_set(root, shards=n, seqs=seqs, ctx=ctx, d=d, codec="shuffle-zstd", level=1)
    s, z = open_set(url), open_set(zurl)
    files = [Path(url) / r.file for r in s.records]
    zfiles = [Path(zurl) / r.file for r in z.records]
    stored = s.n_tokens * d * 2
    f32 = torch.float32

    def ds(u: str = url, **kw) -> ActivationDataset:
        return ActivationDataset(u, batch, **{"shuffle_buffer": buffer, "dtype": f32, **kw})

    def epoch(batches) -> Callable[[], None]:
        return lambda: drain(batches)

    shuffled = ds()
    load_before = os.getloadavg()
    methods = {
        "raw_read": lambda: drain(f.read_bytes() for f in files),
        "floor_f32": lambda: drain(load_file(f)["activations"].to(f32) for f in files),
        "floor_f16": lambda: drain(load_file(f)["activations"].clone() for f in files),  # load_file maps lazily
        "open_set_f32": lambda: drain(x.activations.to(f32) for x in open_set(url)),  # views: cast to touch the bytes
        "ds_in_order_f32": epoch(ds(shuffle_buffer=0)),
        "ds_shuffle_f32": epoch(shuffled),
        "ds_shuffle_f16": epoch(ds(dtype=None)),
        "ds_shuffle_f32_verify": epoch(ds(verify=True)),
        "ds_shuffle_f32_exclude_special": epoch(ds(exclude_special_tokens=True)),
        "ds_shuffle_f32_normalize_scale": epoch(ds(normalize="scale")),
        "loader_0_workers": epoch(DataLoader(shuffled, batch_size=None, num_workers=0)),
        "loader_1_worker": epoch(DataLoader(ds(), batch_size=None, num_workers=1, persistent_workers=True)),
        "loader_2_workers": epoch(DataLoader(ds(), batch_size=None, num_workers=2, persistent_workers=True)),
        "shuffle_zstd_decode": lambda: drain(shard.decode(f.read_bytes(), codec="shuffle-zstd") for f in zfiles),
        "ds_shuffle_f32_shuffle_zstd": epoch(ds(zurl)),
    }
    times = round_robin(methods, reps)
    res: dict = {
        "set": {
            "d": d,
            "dtype": "float16",
            "context_size": ctx,
            "shards": n,
            "tokens_per_shard": seqs * ctx,
            "stored_activation_MB": round(stored / 1e6, 1),
            "batch_size": batch,
            "shuffle_buffer_rows": buffer,
        },
        "reps": reps,
        "load_avg_before": load_before,
    }
    res["GB_s"] = {k: round(stored / median(v) / 1e9, 3) for k, v in times.items()}
    for floor in ("floor_f32", "floor_f16"):
        res[f"vs_{floor}"] = {
            k: round(median([f / t for f, t in zip(times[floor], v, strict=True)]), 3) for k, v in times.items()
        }
    everything = sum(float(x.activations.double().sum()) for x in s)  # same rows, each once, as the floor's
    got = sum(float(b.double().sum()) for b in ds())
    res["check"] = {
        "shuffled_epoch_sum_equals_the_sets": abs(got - everything) <= 1e-6 * abs(everything) + 1e-3,
        "rows_per_epoch": ds().n_tokens == s.n_tokens,
    }
    res["load_avg_after"] = os.getloadavg()
    del shuffled
    methods.clear()  # the loaders' persistent workers and the buffers go before the next parts
    gc.collect()
    s3_set = url if smoke else setwriter.write_set(root, shards=3, seqs=seqs, ctx=ctx, d=d, seed=3)
    res["s3"] = reader_s3(work, s3_set, batch, buffer, reps)
    if not smoke:
        res["peak_rss"] = reader_rss(root, url, n, seqs, ctx, d, batch, buffer)
    return res


def reader_small(work: Path, smoke: bool, reps: int) -> dict:
    """Shuffled float32 reading of small shards against the floor, round-robin: 13 shards of 9.4 MB (d=768
    float16, 48 sequences of 128), and the same number of rows in 2 shards of 61 MB for comparison. Each size has
    its own floor (safetensors load + cast) and its own ratios; ``read_f32`` is the reader's own shard read + cast
    (``open_set(url).read``: open, header and record checks) without batching; ``floor_f32_one_thread`` is the
    floor on one intra-op thread, as the reader's own copies run; ``ds_in_order_f32_two_threads`` reads in order
    with 2 threads making the batches (``threads=2``; the default there is one). ``ds_shuffle_f32_fill_alone``
    fills the buffer in the iterating thread alone, ``ds_shuffle_f32_two_threads`` makes batches with 2 threads:
    on a machine of more than 2 CPUs, what sharing the fill and more threads bring (on 2 CPUs all three are the
    same reader)."""
    import torch
    from safetensors.torch import load_file

    from actcache.read.dataset import ActivationDataset
    from actcache.read.reader import open_set
    from actcache.read.threads import one_thread

    sys.path.insert(0, str(ROOT / "tests"))
    import setwriter

    d, ctx, small, large = (64, 32, (4, 4), (2, 8)) if smoke else (768, 128, (13, 48), (2, 312))
    batch, buffer = (64, 256) if smoke else (4096, 1 << 17)
    f32 = torch.float32
    root = work / "reader_small"
    methods: dict = {}
    sets: dict = {}
    for name, (shards, seqs) in (("small", small), ("large", large)):
        url = setwriter.write_set(root / name, shards=shards, seqs=seqs, ctx=ctx, d=d, with_stats=True)
        s = open_set(url)
        files = [Path(url) / r.file for r in s.records]
        sets[name] = {"shards": shards, "MB_per_shard": round(files[0].stat().st_size / 1e6, 1), "rows": s.n_tokens}
        shuffled = ActivationDataset(url, batch, shuffle_buffer=buffer, dtype=f32)
        in_order = ActivationDataset(url, batch, dtype=f32)
        methods[f"floor_f32_{name}"] = lambda files=files: drain(load_file(f)["activations"].to(f32) for f in files)
        methods[f"floor_f32_one_thread_{name}"] = lambda files=files: drain(
            one_thread(load_file(f)["activations"].to(f32) for f in files)
        )
        methods[f"read_f32_{name}"] = lambda s=s: drain(s.read(r).activations.to(f32) for r in s.records)
        methods[f"ds_in_order_f32_{name}"] = lambda ds=in_order: drain(ds)
        in_order_two = ActivationDataset(url, batch, dtype=f32, threads=2)
        methods[f"ds_in_order_f32_two_threads_{name}"] = lambda ds=in_order_two: drain(ds)
        methods[f"ds_shuffle_f32_{name}"] = lambda ds=shuffled: drain(ds)
        methods[f"ds_shuffle_f32_fill_alone_{name}"] = lambda ds=shuffled: drain(unsplit(ds))
        two = ActivationDataset(url, batch, shuffle_buffer=buffer, dtype=f32, threads=2)
        methods[f"ds_shuffle_f32_two_threads_{name}"] = lambda ds=two: drain(ds)
    load_before = os.getloadavg()
    times = round_robin(methods, reps)
    res: dict = {"sets": sets, "d": d, "batch_size": batch, "shuffle_buffer_rows": buffer, "reps": reps}
    res["load_avg_before"], res["load_avg_after"] = load_before, os.getloadavg()
    res["median_s"] = {k: round(median(v), 4) for k, v in times.items()}
    for name in sets:
        floor = times[f"floor_f32_{name}"]
        res[f"vs_floor_f32_{name}"] = {
            k: round(median([f / t for f, t in zip(floor, v, strict=True)]), 3)
            for k, v in times.items()
            if k.endswith(name)
        }
    return res


def unsplit(ds):
    """``ds``'s batches with each buffer fill made by the iterating thread alone (as before 0.7.2), for a side by
    side with the fill shared between the batch-making threads."""
    from actcache.read import batches

    was, batches.FILL_SPLIT_MIN = batches.FILL_SPLIT_MIN, 1 << 62
    try:
        yield from ds
    finally:
        batches.FILL_SPLIT_MIN = was


def reader_s3(work: Path, url: str, batch: int, buffer: int, reps: int) -> dict:
    """The set copied to a moto_server on loopback; ActivationDataset and open_set against boto3 get_object of the
    same objects from the same endpoint (one at a time, and 4 threads)."""
    import importlib.util
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from actcache.read.dataset import ActivationDataset
    from actcache.read.reader import open_set
    from actcache.sets.copy import copy_set

    spec = importlib.util.spec_from_file_location("bench_s3_server", ROOT / "tests" / "s3_server.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    server = mod.start(work / "moto_server.log")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    try:
        os.environ.update({k: v for k, v in server.env("writer").items() if k != "AWS_ENDPOINT_URL"})
        options = {"endpoint_url": server.endpoint}
        s3_url = copy_set(url, server.new_prefix(), dest_options=options).url
        s = open_set(s3_url, options)
        client, prefix = server.client(), s3_url.removeprefix(f"s3://{server.bucket}/")
        keys = [f"{prefix}/{r.file}" for r in s.records]
        stored = s.n_tokens * s.d * 2

        def get(key: str) -> bytes:
            return client.get_object(Bucket=server.bucket, Key=key)["Body"].read()

        def threaded() -> None:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(get, keys))

        def epoch(batches) -> Callable[[], None]:
            return lambda: drain(batches)

        methods = {
            "boto3_sequential": lambda: drain(get(k) for k in keys),
            "boto3_4_threads": threaded,
            "open_set": lambda: drain(x.activations for x in open_set(s3_url, options)),
            "ds_in_order_prefetch_4": epoch(ActivationDataset(s3_url, batch, prefetch=4, storage_options=options)),
            "ds_shuffle_f32_prefetch_4": epoch(
                ActivationDataset(
                    s3_url, batch, shuffle_buffer=buffer, prefetch=4, dtype=torch.float32, storage_options=options
                )
            ),
        }
        times = round_robin(methods, reps)
        out = {
            "shards": len(keys),
            "MB": round(stored / 1e6, 1),
            "GB_s": {k: round(stored / median(v) / 1e9, 3) for k, v in times.items()},
        }
        for ref in ("boto3_sequential", "boto3_4_threads"):
            out[f"vs_{ref}"] = {
                k: round(median([f / t for f, t in zip(times[ref], v, strict=True)]), 3) for k, v in times.items()
            }
        return out
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reader_rss(root: Path, url: str, n: int, seqs: int, ctx: int, d: int, batch: int, buffer: int) -> dict:
    """Peak RSS of one shuffled float32 epoch, each in its own process, for sets of n/4, n and 3n shards."""
    sys.path.insert(0, str(ROOT / "tests"))
    import setwriter

    out = {}
    for shards in (max(n // 4, 1), n, 3 * n):
        u = url if shards == n else setwriter.write_set(root, shards=shards, seqs=seqs, ctx=ctx, d=d, seed=shards)
        out[f"{shards}_shards"] = {
            "set_MB": round(shards * seqs * ctx * d * 2 / 1e6, 1),
            **child(["--reader-rss-child", u, str(batch), str(buffer)]),
        }
        if u != url:
            shutil.rmtree(u, ignore_errors=True)
    out["bound_MB"] = {
        "buffer_as_stored_float16": round(buffer * d * 2 / 1e6, 1),
        "prefetch_2_plus_1_shards": round(3 * seqs * ctx * d * 2 / 1e6, 1),
        "two_batches_being_made_float32": round(2 * batch * d * 4 / 1e6, 1),
    }
    return out


def reader_rss_child(url: str, batch: str, buffer: str) -> None:
    import torch

    from actcache.read.dataset import ActivationDataset

    base = rss_mb()
    rows = sum(len(b) for b in ActivationDataset(url, int(batch), shuffle_buffer=int(buffer), dtype=torch.float32))
    print(json.dumps({"peak_rss_mb": round(rss_mb(), 1), "after_imports_mb": round(base, 1), "rows": rows}))


def print_reader(r: dict) -> None:
    print(f"\n== reading back: {r['set']}, load avg {r['load_avg_before']} -> {r['load_avg_after']}")
    print(f"{'method':34} {'GB/s':>7} {'vs floor f32':>13} {'vs floor f16':>13}")
    for k, v in r["GB_s"].items():
        print(f"{k:34} {v:>7.3f} {r['vs_floor_f32'][k]:>13.3f} {r['vs_floor_f16'][k]:>13.3f}")
    print(f"checks={r['check']}")
    s3 = r["s3"]
    print(f"\n== reading back from S3 (moto_server on loopback, {s3['shards']} shards, {s3['MB']} MB)")
    for k, v in s3["GB_s"].items():
        print(
            f"{k:34} {v:>7.3f} GB/s  vs boto3 sequential {s3['vs_boto3_sequential'][k]:>6.3f}"
            f"  vs boto3 4 threads {s3['vs_boto3_4_threads'][k]:>6.3f}"
        )
    if "peak_rss" in r:
        print(f"\n== peak RSS of a shuffled float32 epoch\n{json.dumps(r['peak_rss'], indent=1)}")


# -- report ------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    from importlib import metadata

    import torch

    def v(p):
        with contextlib.suppress(Exception):
            return metadata.version(p)
        return None

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": os.getloadavg(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "python": platform.python_version(),
        "versions": {
            p: v(p) for p in ("torch", "transformers", "transformer-lens", "prefect", "safetensors", "zstandard")
        },
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def print_table(res: dict) -> None:
    for shape, r in res.get("speed", {}).items():
        print(f"\n== {shape} tokens per batch; hook {HOOK}")
        print(f"{'method':8} {'tokens/s':>10} {'vs (d)':>8}")
        for k in (*SPEED_METHODS, "e", "e_raw"):
            print(f"{k:8} {r['tokens_per_s'][k]:>10.1f} {r['vs_d'][k]:>8.3f}")
        tps = r["tokens_per_s"]
        print(
            f"(c)/(d)={tps['c'] / tps['d']:.3f} (paired: {r['c_over_d_paired']})"
            f" (c)/(a)={tps['c'] / tps['a']:.2f} (d)/(a)={tps['d'] / tps['a']:.2f}"
            f" (a)/(d) matmul FLOPs={r['a_over_d_matmul_flops']} (e)/(c)={tps['e'] / tps['c']:.3f}"
            f"  empty flow (e0)={r['e0_empty_flow_s']} s  checks={r['check']}"
        )
    for shape, r in res.get("peak_rss", {}).items():
        print(
            f"\n== peak RSS MB ({shape}, separate processes): "
            + ", ".join(f"{k}={v.get('peak_rss_mb', v)}" for k, v in r.items())
        )
    for key in ("several_hooks", "stats_cost", "pipeline_overhead", "warm_rerun", "cold_start", "rss_growth"):
        if key in res:
            print(f"\n== {key}\n{json.dumps(res[key], indent=1)}")
    if "reader" in res:
        print_reader(res["reader"])
    if "reader_small" in res:
        r = res["reader_small"]
        print(f"\n== reading small shards back: {r['sets']}, load avg {r['load_avg_before']} -> {r['load_avg_after']}")
        for name in r["sets"]:
            print(json.dumps(r[f"vs_floor_f32_{name}"]))
    if "compression" in res:
        print("\n== compression (" + res["compression"]["note"] + ")")
        print(f"{'dtype':9} {'codec':15} {'B/token':>8} {'ratio':>6} {'enc MB/s':>9} {'dec MB/s':>9}")
        for row in res["compression"]["rows"]:
            print(
                f"{row['dtype']:9} {row['codec']:15} {row['bytes_per_token']:>8} {row['ratio']:>6} "
                f"{row['encode_MB_s']:>9} {row['decode_MB_s'] or '-':>9}"
            )


SECTIONS = (
    "speed",
    "peak_rss",
    "several_hooks",
    "compression",
    "stats_cost",
    "pipeline_overhead",
    "warm_rerun",
    "cold_start",
    "rss_growth",
    "memory",
    "reader",
    "reader_small",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", help="tiny model, one rep: checks the benchmark runs (~1 min on 2 CPU cores)"
    )
    ap.add_argument("--reps", type=int, default=None, help="rounds per measurement (default 5; 1 with --smoke)")
    ap.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections of {', '.join(SECTIONS)}; or gpu alone: bench/gpu_check.py",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="where the results go (default: a new temporary file)")
    ap.add_argument(
        "--update-results",
        action="store_true",
        help=f"write the committed {RESULTS.relative_to(ROOT)} (what a full run on the reference machine is for)",
    )
    ap.add_argument("--shapes", default=None, help="batch shapes as BxT,BxT (default 8x128,16x256; 2x32 with --smoke)")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--warm-child", help=argparse.SUPPRESS)
    ap.add_argument("--cold-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--flow-rss-child", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--memory-before",
        metavar="GIT_REF",
        default=None,
        help="memory section: also measure the checkout at this git ref (e.g. the commit before a change)",
    )
    ap.add_argument("--memory-widths", default=",".join(map(str, MEMORY_WIDTHS)), help="memory section: model widths")
    ap.add_argument("--memory-regimes", default=",".join(MEMORY_REGIMES), help="memory section: forward, fast")
    ap.add_argument("--memory-codecs", default="none", help="memory section: codecs (none, zstd, shuffle-zstd)")
    ap.add_argument(
        "--memory-mib",
        default=",".join(map(str, MEMORY_SHARD_MIB)),
        help="memory section: shard sizes in MiB of float16 activations",
    )
    ap.add_argument("--reader-rss-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.only.strip() == "gpu":  # every CUDA path, checked: its own script, its own exit codes
        from bench import gpu_check

        return gpu_check.main(["--device", "cuda" if args.device == "auto" else args.device])
    if args.rss_child:
        b, c = map(int, args.shape.split("x"))
        rss_child(args.rss_child, Path(args.src), Path(args.work), args.device, b, c)
        return 0
    if args.warm_child:
        warm_child(args.warm_child)
        return 0
    if args.cold_child:
        cold_child(*args.cold_child)
        return 0
    if args.flow_rss_child:
        flow_rss_child(*args.flow_rss_child)
        return 0
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    if args.reader_rss_child:
        reader_rss_child(*args.reader_rss_child)
        return 0

    quiet_prefect()
    from actcache.extraction.forward import pick_device

    device = pick_device(args.device)
    smoke = args.smoke
    reps = args.reps or (1 if smoke else 5)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    if args.update_results and args.out:
        ap.error("--update-results writes bench/results.json; leave out --out")
    if args.update_results:
        args.out = str(RESULTS)
    elif not args.out:
        fd, args.out = tempfile.mkstemp(prefix="actcache-bench-", suffix=".json")
        os.close(fd)
    mode = "smoke" if smoke else "full" if set(only) == set(SECTIONS) else "only " + ",".join(only)
    # bench/RESULTS.md: --smoke 53.5 s; the full run 28 min before the memory (~20 min per width) and reader sections
    expected = "~1 min" if smoke else "over 1 h" if mode == "full" else "a part of the full run's hour and more"
    print(
        f"[bench] {mode}: expect {expected} on 2 CPU cores; results to {args.out}",
        file=sys.stderr,
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="actcache-bench-"))
    res: dict = {"smoke": smoke, "reps": reps, "environment": environment(device)}
    t_all = time.perf_counter()

    def save() -> None:  # after every section: a killed run keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"[bench] {list(res)[-1]} done at {time.perf_counter() - t_all:.0f} s", file=sys.stderr, flush=True)

    def section(name: str) -> bool:
        if name not in only:
            return False
        _SECTION[0] = name
        print(f"[bench] {name}: starting at {time.perf_counter() - t_all:.0f} s", file=sys.stderr, flush=True)
        return True

    try:
        src = build_model(smoke) if set(only) - {"reader", "reader_small"} else None  # reading back needs no model
        n_layers = 6 if smoke else 12
        shapes = [(2, 32)] if smoke else [(8, 128), (16, 256)]
        if args.shapes:
            shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
        if section("speed"):
            t = time.perf_counter()
            empty_flow()()
            res["prefect_first_flow_in_process_s"] = round(time.perf_counter() - t, 2)
            res["speed"] = speed(src, work, device, shapes, reps, smoke)
            save()
        if not smoke and section("peak_rss"):  # a process per method: minutes of start-up
            res["peak_rss"] = peak_rss(src, work, device, shapes[:1] if smoke else shapes)
            save()
        if section("several_hooks"):
            b, c = shapes[0]
            res["several_hooks"] = several_hooks(src, device, b, c, reps, n_layers)
            save()
        if section("compression"):
            b, c = shapes[0]
            res["compression"] = compression(src, device, b, c, max(reps - 2, 1))
            save()
        if section("stats_cost"):
            b, c = shapes[0]
            res["stats_cost"] = stats_cost(src, device, b, c, reps if smoke else max(reps, 9))
            save()
        if section("pipeline_overhead"):
            res["pipeline_overhead"] = pipeline_overhead(src, work, (3, 8) if smoke else (20, 120))
            sizes = {1 << 12: 4} if smoke else {1 << 14: 12, 1 << 16: 8, 1 << 18: 5}
            res["pipeline_overhead"]["gpu_rate"] = gpu_rate_overhead(src, work, 1e5, sizes)
            save()
        if section("warm_rerun"):
            n = 50 if smoke else 1000
            made = make_complete_set(src, work, n)
            if smoke:  # no second Prefect start: same steps in this process, model caches emptied first
                res["warm_rerun"] = {"shards": n, **warm_in_process(made["config"])}
            else:
                res["warm_rerun"] = {"shards": n, **child(["--warm-child", json.dumps(made["config"])])}
            save()
        if not smoke and section("cold_start"):
            res["cold_start"] = cold_start(work, max(reps, 3))
            save()
        if not smoke and section("memory"):  # a process per point, minutes each at width 4096
            res["memory"] = memory(
                work,
                [int(w) for w in args.memory_widths.split(",")],
                [int(m) for m in args.memory_mib.split(",")],
                args.memory_regimes.split(","),
                args.memory_codecs.split(","),
                args.memory_before,
            )
            save()
        if not smoke and section("rss_growth"):
            res["rss_growth"] = rss_growth(
                src, work, device, 32 if smoke else 128, 4 if smoke else 16, 2 if smoke else 4
            )
            save()
        if section("reader"):
            res["reader"] = reader(work, smoke, max(reps - 2, 1) if not smoke else 1)
            save()
        if section("reader_small"):
            res["reader_small"] = reader_small(work, smoke, reps)
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["total_seconds"] = round(time.perf_counter() - t_all, 1)
    res["environment"]["load_avg_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print_table(res)
    print(f"\nwrote {args.out} in {res['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
