"""Least-squares fold vs plain drop on fmnist_vgg, before fine-tuning, over the ridge penalty.

For every clustering threshold: functional pruning (as ``netcarve reproduce fop``: activation
profile + class preference on --probe random train images, agglomerative clustering, the
largest-L1 filter of every cluster stays) and magnitude pruning of the same filter counts, each
applied with ``fold="none"`` and with ``fold="lstsq"`` at every ridge penalty (fitted on the
same probe images); top-1 accuracy on the first --eval test images. All networks at one
threshold have identical multiply-adds.

Run: .venv/bin/python bench/quality_fold.py [--thresholds 0.8,0.7] [--ridges 1e-3,1e-2,1e-1]
"""

from __future__ import annotations

import argparse
import time

import torch

from netcarve.function.pruning import compare_pruning, functional_prune, magnitude_masks
from netcarve.training.evaluation import reference_data
from netcarve.zoo import load_model

LAYERS = ["features.4", "features.7", "features.11", "features.14"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thresholds", default="0.8,0.7")
    parser.add_argument("--ridges", default="1e-3,1e-2,1e-1")
    parser.add_argument("--probe", type=int, default=1000)
    parser.add_argument("--eval", dest="n_eval", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lm = load_model("fmnist_vgg")
    train_x, train_y = reference_data(lm.preset, "train")
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed))
    probe_x, probe_y = train_x[perm][:args.probe], train_y[perm][:args.probe]
    test_x, test_y = reference_data(lm.preset, "test", limit=args.n_eval)
    ridges = [float(r) for r in args.ridges.split(",")]
    print("| threshold | MACs removed | functional drop | " + " | ".join(
        f"functional fold {r:g}" for r in ridges) + " | magnitude drop | " + " | ".join(
        f"magnitude fold {r:g}" for r in ridges) + " |")
    print("|---|---|---|" + "---|" * (2 * len(ridges) + 1))
    for threshold in (float(t) for t in args.thresholds.split(",")):
        fop = functional_prune(lm.model, LAYERS, probe_x, probe_y, preset=lm.preset,
                               threshold=threshold, seed=args.seed)
        masks = {"functional": fop.masks(),
                 "magnitude": magnitude_masks(lm.model, fop.removed_counts())}
        acc: dict[tuple[str, float | None], float] = {}

        macs = base = None
        for ridge in [None, *ridges]:
            cmp = compare_pruning(lm.model, masks, preset=lm.preset, eval_images=test_x,
                                  eval_labels=test_y, finetune_epochs=0, seed=args.seed,
                                  fold="none" if ridge is None else "lstsq",
                                  fold_images=probe_x, ridge=ridge or 0.0)
            for row in cmp.rows:
                acc[(row["method"], ridge)] = row["accuracy_pruned"]
                macs, base = row["macs_removed"], row["accuracy_original"]
        cells = []
        for method in ("functional", "magnitude"):
            cells += [f"{acc[(method, r)]:.2%}" for r in [None, *ridges]]
        print(f"| {threshold:g} | {macs:.1%} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nunpruned {base:.2%}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
