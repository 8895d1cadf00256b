"""Function-pruned vs magnitude-pruned fmnist_vgg at the same multiply-adds.

Run: .venv/bin/python bench/quality_fop.py [--threshold 0.8] [--layers ...] [--out out/quality_fop]

What it does (every number printed is measured here, whatever it shows):

1. functional pruning (descriptors: activation profile + class preference on 1,000 train
   images; cosine similarity of the layer-relative descriptors; agglomerative clustering at
   ``--threshold``; keep rule: weight L1) of the conv layers ``--layers``;
2. magnitude (weight L1) pruning of the same number of filters in every layer, hence the same
   parameters and multiply-adds;
3. top-1 accuracy of both physically smaller networks on ``--eval`` test images, before
   fine-tuning, and after fine-tuning with every learning rate × epoch count (SGD + Nesterov,
   cosine schedule, ``--finetune-images`` train images per epoch, same seed for both);
4. functionality defection: every surviving filter's descriptor (class preference, activation
   profile) before vs after each fine-tuning, as cosine similarity (raw descriptors and
   layer-relative ones), and against the same filter in the unpruned network.

Writes defection.csv, defection.png, comparison.csv, clusters_*.png and summary.json to --out
and prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch


def main() -> None:
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

    from netcarve.evaluation import reference_data
    from netcarve.functional import compare_pruning, defection, functional_prune, magnitude_masks
    from netcarve.zoo import load_model

    start = time.perf_counter()
    lm = load_model("fmnist_vgg")
    train_x, train_y = reference_data(lm.preset, "train")
    gen = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(train_x), generator=gen)
    train_x, train_y = train_x[perm], train_y[perm]
    probe_x, probe_y = train_x[: args.probe], train_y[: args.probe]
    test_x, test_y = reference_data(lm.preset, "test", limit=args.n_eval)
    layers = [s for s in args.layers.split(",") if s]

    t0 = time.perf_counter()
    fop = functional_prune(lm.model, layers, probe_x, probe_y, preset=lm.preset,
                           threshold=args.threshold, seed=args.seed)
    t_fop = time.perf_counter() - t0
    counts = fop.removed_counts()
    masks = {"functional": fop.masks(), "magnitude": magnitude_masks(lm.model, counts)}
    cmp = compare_pruning(lm.model, masks, preset=lm.preset, eval_images=test_x,
                          eval_labels=test_y, finetune_epochs=0, seed=args.seed)
    settings = [(float(lr), int(ep)) for lr in args.lrs.split(",")
                for ep in args.epochs.split(",")]
    t0 = time.perf_counter()
    report = defection(lm.model, masks, probe_x[:256], preset=lm.preset, settings=settings,
                       train_images=train_x, train_labels=train_y,
                       max_train_images=args.finetune_images, eval_images=test_x,
                       eval_labels=test_y, seed=args.seed)
    t_def = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    fop.save(args.out)
    cmp.save_csv(args.out / "comparison.csv")
    report.save_csv(args.out / "defection.csv")
    report.plot(args.out / "defection.png")
    (args.out / "summary.json").write_text(json.dumps(
        {"pruning": fop.summary(), "comparison": cmp.to_dict(), "defection": report.to_dict()},
        indent=2, default=str))

    rows = {r["method"]: r for r in cmp.rows}
    f, m = rows["functional"], rows["magnitude"]
    print(f"## Functional vs magnitude pruning of fmnist_vgg (threshold {args.threshold}, "
          f"{args.threads} thread{'s' if args.threads != 1 else ''}, load average "
          f"{os.getloadavg()[0]:.1f} at the end)\n")
    print(f"Layers {', '.join(layers)}: filters removed "
          + ", ".join(f"{k} {v}/{fop.layers[k].keep.numel()}" for k, v in counts.items())
          + f" ({sum(counts.values())} in all); functional pruning took {t_fop:.1f} s.")
    print(f"Both networks: multiply-adds {f['macs_before']:,} → {f['macs_after']:,} "
          f"(−{f['macs_removed']:.1%}), parameters {f['params_before']:,} → "
          f"{f['params_after']:,} (−{f['params_removed']:.1%}). Unpruned accuracy "
          f"{f['accuracy_original']:.2%} on {args.n_eval:,} test images.\n")
    print("| accuracy | functional | magnitude (L1) |")
    print("|---|---|---|")
    print(f"| before fine-tuning | {f['accuracy_pruned']:.2%} | {m['accuracy_pruned']:.2%} |")
    runs = {(r["method"], r["lr"], r["epochs"]): r for r in report.runs}
    for lr, ep in settings:
        a, b = runs[("functional", lr, ep)], runs[("magnitude", lr, ep)]
        print(f"| after fine-tuning, lr {lr:g}, {ep} epoch(s) of {args.finetune_images:,} "
              f"images | {a['accuracy_after']:.2%} | {b['accuracy_after']:.2%} |")
    print()
    print("Descriptor drift of surviving filters, all pruned layers pooled: mean cosine "
          "similarity of each survivor's descriptor in the pruned network before vs after "
          "fine-tuning (raw descriptor / layer-relative descriptor), and after fine-tuning vs "
          "the same filter in the unpruned network (raw):\n")
    print("| descriptor | setting | functional: before→after (raw / relative) | "
          "magnitude: before→after (raw / relative) | functional: vs unpruned | "
          "magnitude: vs unpruned |")
    print("|---|---|---|---|---|---|")
    pooled: dict[tuple, list[dict]] = {}
    for r in report.rows:
        pooled.setdefault((r["descriptor"], r["lr"], r["epochs"], r["method"]), []).append(r)

    def mean(key: tuple, field: str) -> float:
        vals = [r[field] for r in pooled[key] if math.isfinite(r[field])]
        return sum(vals) / max(1, len(vals))

    undefined = sum(not math.isfinite(r["cosine"]) for r in report.rows)
    for kind in ("class_preference", "profile"):
        for lr, ep in settings:
            cells = []
            for method in ("functional", "magnitude"):
                key = (kind, lr, ep, method)
                cells.append(f"{mean(key, 'cosine'):.3f} / {mean(key, 'cosine_relative'):.3f}")
            for method in ("functional", "magnitude"):
                cells.append(f"{mean((kind, lr, ep, method), 'cosine_vs_original'):.3f}")
            print(f"| {kind} | lr {lr:g}, {ep} ep | " + " | ".join(cells) + " |")
    print(f"\n({undefined} of {len(report.rows)} survivor × setting × descriptor rows have an "
          "undefined cosine -- an all-zero descriptor, e.g. a filter never active on the probe "
          "images -- and are left out.)")
    print()
    print("Per layer (class preference, layer-relative cosine, lr "
          f"{settings[0][0]:g}, {settings[0][1]} epoch):\n")
    print("| layer | functional | magnitude (L1) |")
    print("|---|---|---|")
    lr0, ep0 = settings[0]
    for layer in layers:
        cells = []
        for method in ("functional", "magnitude"):
            vals = [r["cosine_relative"] for r in report.rows if r["layer"] == layer
                    and r["method"] == method and r["descriptor"] == "class_preference"
                    and (r["lr"], r["epochs"]) == (lr0, ep0)
                    and math.isfinite(r["cosine_relative"])]
            cells.append(f"{sum(vals) / len(vals):.3f} (min {min(vals):.3f})")
        print(f"| {layer} | {cells[0]} | {cells[1]} |")
    print(f"\nDefection runs took {t_def:.0f} s; everything {time.perf_counter() - start:.0f} s. "
          f"Files in {args.out}.")


if __name__ == "__main__":
    main()
