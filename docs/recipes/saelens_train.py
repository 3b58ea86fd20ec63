"""Train a SAELens SAE from an actcache set in place: no copy, no model, no text dataset.

Run in an environment with SAELens and actcache (without the [extract] extra) side by side:

    python docs/recipes/saelens_train.py ./activations/<set_id> ./sae --steps 1000 --batch 4096

It prints the saved SAE's folder. tests/test_trainers.py runs it with the wheel and `sae-lens` from PyPI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from sae_lens import LoggingConfig, StandardTrainingSAE, StandardTrainingSAEConfig

import actcache
from actcache.read import saelens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", help="the set's URL: a local folder, s3://..., hf://datasets/...")
    ap.add_argument("out", help="folder for the trained SAE (cfg.json, sae_weights.safetensors)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=4096, help="rows (tokens) per step")
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    ds = actcache.ActivationDataset(
        args.set,
        batch_size=args.batch,
        shuffle_buffer=max(args.batch, 1 << 18),
        dtype=torch.float32,
        exclude_special_tokens=True,  # exact: the set's scale below is over the rows kept
        drop_bos=True,
    )
    sae = StandardTrainingSAE(
        StandardTrainingSAEConfig(
            d_in=ds.d,
            d_sae=args.expansion * ds.d,
            normalize_activations="expected_average_only_in",  # the set's exact scale, folded in at the end
            device=args.device,
        )
    )
    saelens.train(
        ds,
        sae,
        training_tokens=args.steps * args.batch,
        output_path=args.out,
        lr=3e-4,
        device=args.device,
        logger=LoggingConfig(log_to_wandb=False),
    )
    cfg = json.loads((Path(args.out) / "cfg.json").read_text())
    print(f"saved {args.out}: d_in {cfg['d_in']}, d_sae {cfg['d_sae']}, from {cfg['metadata']['dataset_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
