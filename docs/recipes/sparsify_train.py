"""Train an EleutherAI sparsify sparse coder (SAE, or transcoder with --target) from actcache sets in place.

sparsify (PyPI: eai-sparsify) has no activation cache: its Trainer runs the model and hooks it. This is its
training step on ActivationDataset batches instead: the same initialisation (decoder bias at the first batch's
mean), learning rate (2e-4 / sqrt(latents / 2**14)), unit-norm decoder and FVU loss (+ AuxK for dead latents).

    python docs/recipes/sparsify_train.py ./activations/<set_id> ./sae --steps 1000 --batch 4096
    python docs/recipes/sparsify_train.py ./activations/<mlp_in> ./tc --target ./activations/<mlp_out>

The saved folder loads with `SparseCoder.load_from_disk`; its cfg.json also names the set(s) it learned from.
tests/test_trainers.py runs it, as an SAE and as a transcoder, with the wheel and `eai-sparsify` from PyPI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from sparsify import SparseCoder, SparseCoderConfig

import actcache


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", help="the input set's URL: a local folder, s3://..., hf://datasets/...")
    ap.add_argument("out", help="folder for the trained coder (cfg.json, sae.safetensors)")
    ap.add_argument("--target", help="a set of the same tokens to predict (a transcoder), e.g. the MLP's output")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=4096, help="rows (tokens) per step")
    ap.add_argument("--expansion", type=int, default=32)
    ap.add_argument("-k", type=int, default=32, help="active latents per row")
    ap.add_argument("--auxk-alpha", type=float, default=1 / 32)
    ap.add_argument("--dead-after", type=int, default=10_000_000, help="tokens without firing: a latent is dead")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    urls = [args.set, args.target] if args.target else [args.set]
    ds = actcache.ActivationDataset(
        urls,  # several sets: row-aligned tuples (the same token in the same row)
        batch_size=args.batch,
        shuffle_buffer=max(args.batch, 1 << 18),
        dtype=torch.float32,
        exclude_special_tokens=True,
        drop_bos=True,
        normalize="scale",  # each set by its exact scale over the rows kept: multiply inputs by it at inference
    )
    cfg = SparseCoderConfig(expansion_factor=args.expansion, k=args.k, transcode=bool(args.target))
    sae = SparseCoder(ds.sets[0].d, cfg, device=args.device)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (sae.num_latents / 2**14) ** 0.5)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=args.device)
    for step, batch in zip(range(args.steps), actcache.forever(ds), strict=False):
        x, y = batch if args.target else (batch[0], None)
        x = x.to(args.device, non_blocking=True)
        y = y.to(args.device, non_blocking=True) if y is not None else None
        target = x if y is None else y
        if step == 0:  # as sparsify's Trainer: centre the pre-activations at initialisation
            with torch.no_grad():
                if cfg.transcode:
                    sae.encoder.bias.data = -x.mean(0) @ sae.encoder.weight.data.T
                sae.b_dec.data = target.mean(0)
        if not cfg.transcode:
            sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > args.dead_after if args.auxk_alpha > 0 else None
        out = sae(x, y, dead_mask=dead)
        loss = out.fvu + args.auxk_alpha * out.auxk_loss
        loss.backward()
        if not cfg.transcode:
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            fired = torch.zeros_like(since_fired, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            since_fired += len(x)
            since_fired[fired] = 0
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: fvu {out.fvu.item():.3f}", flush=True)

    sae.save_to_disk(args.out)
    # Name what it learned from beside sparsify's own fields (load_from_disk ignores fields it does not know).
    path = Path(args.out) / "cfg.json"
    saved = json.loads(path.read_text())
    saved["actcache"] = {
        "sets": [s.url for s in ds.sets],
        "hooks": [s.manifest["hook"] for s in ds.sets],
        "scale": [st["scale"] for st in ds.stats],  # inputs (and targets) were multiplied by these
        "exclude_special_tokens": True,
        "drop_bos": ds.drop_bos,
    }
    path.write_text(json.dumps(saved))
    print(f"saved {args.out}: {sae.num_latents} latents, from {', '.join(saved['actcache']['sets'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
