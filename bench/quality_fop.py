"""Function-pruned vs magnitude-pruned fmnist_vgg at the same multiply-adds.

A thin wrapper over :mod:`netcarve.reproduce.fop` (the logic lives in the package;
``netcarve reproduce fop`` runs it for two thresholds and writes a full report). This script
keeps the older command-line flags, runs one threshold and prints the Markdown tables.

Run: .venv/bin/python bench/quality_fop.py [--threshold 0.8] [--layers ...] [--out out/quality_fop]

1. functional pruning (activation profile + class preference on --probe train images; cosine
   similarity of the layer-relative descriptors; agglomerative clustering at --threshold; keep
   rule: weight L1) of the conv layers --layers;
2. magnitude (weight L1) pruning of the same number of filters per layer (same MACs);
3. top-1 accuracy of both on --eval test images before and after fine-tuning with every
   learning rate × epoch count (--finetune-images train images per epoch, same seed for both);
4. functionality defection: each surviving filter's descriptors before vs after every
   fine-tuning, and against the same filter in the unpruned network.

Writes defection.csv, defection.png, comparison.csv, clusters_*.png and summary.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from netcarve.reproduce.fop import (
    FopSettings,
    accuracy_markdown,
    defection_markdown,
    fop_vs_magnitude,
    headline,
    per_layer_markdown,
)


def main() -> None:
    """Parse the flags, run one threshold, write the files and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", default="features.4,features.7,features.11,features.14")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--probe", type=int, default=1000)
    parser.add_argument("--eval", dest="n_eval", type=int, default=5000)
    parser.add_argument("--finetune-images", type=int, default=5000)
    parser.add_argument("--lrs", default="0.01,0.001")
    parser.add_argument("--epochs", default="1,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/quality_fop"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    grid = tuple((float(lr), int(ep)) for lr in args.lrs.split(",") if lr
                 for ep in args.epochs.split(",") if ep)
    settings = FopSettings(layers=tuple(s for s in args.layers.split(",") if s),
                           thresholds=(args.threshold,), probe_images=args.probe,
                           eval_images=args.n_eval, finetune_images=args.finetune_images,
                           settings=grid)
    res = fop_vs_magnitude(settings, args.threshold, seed=args.seed,
                           log=lambda m: print(f"  {m}", flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    res["pruning"].save(args.out)
    res["comparison"].save_csv(args.out / "comparison.csv")
    res["defection"].save_csv(args.out / "defection.csv")
    res["defection"].plot(args.out / "defection.png")
    head = headline(res)
    (args.out / "summary.json").write_text(json.dumps(
        {"pruning": res["pruning"].summary(), "comparison": res["comparison"].to_dict(),
         "defection": res["defection"].to_dict(), "headline": head}, indent=2, default=str))
    print(f"## Functional vs magnitude pruning of {res['model']} (threshold {args.threshold}, "
          f"{args.threads} thread{'s' if args.threads != 1 else ''}, load average "
          f"{os.getloadavg()[0]:.1f} at the end)\n")
    print("Filters removed: " + ", ".join(f"{k} {v}" for k, v in res["counts"].items())
          + f"; multiply-adds −{head['macs_removed']:.1%}, parameters "
          f"−{head['params_removed']:.1%} (both networks).\n")
    print(accuracy_markdown(res))
    print("\nDescriptor drift of surviving filters, all pruned layers pooled:\n")
    print(defection_markdown(res))
    print("\nPer layer (class preference, layer-relative cosine, first setting):\n")
    print(per_layer_markdown(res))
    print(f"\nEverything {time.perf_counter() - start:.0f} s. Files in {args.out}.")


if __name__ == "__main__":
    main()
