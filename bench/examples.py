"""Per-example extraction (--packing none) against a truncated HF forward pass over the same batches.

    .venv/bin/python bench/examples.py            # GPT-2-small shape, 256 examples of 5..120 tokens
    .venv/bin/python bench/examples.py --smoke    # tiny GPT-2, 64 examples (~1 min)

(x) actcache: ``examples.compute_shard`` (length-bucketed, right-padded, masked batches; rows selected).
(r) reference: the bare HF model cut after the hook's block (sdpa, inference_mode), over exactly the same
    batches and masks, nothing copied out. Ratio x / r of the fastest of ``--reps`` interleaved rounds (median
    beside it); the issue asks for at most 1.15.
Bytes: a ``last`` set's and an ``all`` set's shard bytes, against 1 / mean_length. Numbers go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    import torch
    from transformers import AutoModel

    from actcache.config import ExtractConfig
    from actcache.extraction import examples
    from actcache.extraction.plan import make_plan
    from actcache.inputs import demo
    from bench.run import build_model

    torch.set_num_threads(2)
    model = build_model(args.smoke)
    n = 64 if args.smoke else 256
    work = Path(tempfile.mkdtemp())
    rng = random.Random(0)
    words = " ".join(demo.corpus_lines()[:400]).split()
    lines = [" ".join(rng.choices(words, k=rng.randint(2, 45))) for _ in range(n)]
    (work / "ex.txt").write_text("\n".join(lines) + "\n")
    hook, layer = "blocks.5.hook_resid_post", 5
    out = {}
    for positions in ("last", "all"):
        cfg = ExtractConfig(
            model=str(model),
            dataset=str(work / "ex.txt"),
            store=str(work / "store"),
            device="cpu",
            hook=hook,
            packing="none",
            positions=positions,
            context_size=120,
            max_tokens=120 * n,
            shard_tokens=120 * n,
            batch_size=8,
            dtype="float16",
        )
        plan = make_plan(cfg)
        ex = examples.prepare(plan, n)
        lengths = [len(x) for x in ex.ids]
        if positions == "last":
            hf = AutoModel.from_pretrained(model, attn_implementation="sdpa", num_hidden_layers=layer + 1).eval()
            groups = examples.batches(lengths, 8)
            padded = []
            for g in groups:
                w = max(lengths[i] for i in g)
                t = torch.zeros((len(g), w), dtype=torch.long)
                m = torch.zeros((len(g), w), dtype=torch.long)
                for j, i in enumerate(g):
                    t[j, : lengths[i]] = torch.tensor(ex.ids[i])
                    m[j, : lengths[i]] = 1
                padded.append((t, m))

            def reference(hf=hf, padded=padded):
                with torch.inference_mode():
                    for t, m in padded:
                        hf(input_ids=t, attention_mask=m, use_cache=False)

            def ours(plan=plan, ids=ex.ids):
                examples.compute_shard(plan, [hook], ids)

            times = {"x": [], "r": []}
            ours()
            reference()  # warm-up
            for _ in range(args.reps):
                for name, fn in (("x", ours), ("r", reference)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            # Interleaved rounds; on a shared, loaded machine the fastest round of each is the least disturbed
            # (the ratio of minima), the median is given beside it.
            x, r = statistics.median(times["x"]), statistics.median(times["r"])
            xm, rm = min(times["x"]), min(times["r"])
            out["speed"] = {
                "examples": n,
                "tokens": sum(lengths),
                "rounds": args.reps,
                "x_min_s": round(xm, 4),
                "r_min_s": round(rm, 4),
                "ratio": round(xm / rm, 3),
                "ratio_median": round(x / r, 3),
            }
        (url,) = examples.extract(plan)
        out[f"bytes_{positions}"] = sum(p.stat().st_size for p in Path(url).glob("shards/*"))
        out["mean_length"] = statistics.mean(lengths)
    out["last_over_all"] = round(out["bytes_last"] / out["bytes_all"], 4)
    out["one_over_mean_length"] = round(1 / out["mean_length"], 4)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
