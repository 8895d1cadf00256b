"""CAR quality: accuracy kept by CAR vs baselines on fmnist_vgg; colour vs shape (colour model).

A thin wrapper over :mod:`netcarve.reproduce.car` (the logic lives in the package;
``netcarve reproduce car`` runs the same experiments and writes a full report). This script
keeps the older command-line flags and prints the Markdown tables.

Run: .venv/bin/python bench/quality_car.py [--part fmnist|colour|all] [--finetune 1]

fmnist: prune 50% of the filters of features.0 and, separately, of features.4 of fmnist_vgg by
    greedy CAR and by each baseline (random, L1, mean activation, APoZ, Taylor), scored on
    --images random train images, evaluated on the first --eval-images test images; with
    --finetune E, each method's pruned model at 50% is fine-tuned E epochs on
    --finetune-images random train images and evaluated again.
colour: colour-selective fraction among the first --k filters of --colour-model features.0
    (default shapes_clutter_cnn; shapes_colour_cnn is the control, shapes_cnn the original
    saturated setting) pruned by greedy CAR (and one-shot CAR, and L1) vs the kept ones,
    scored on --colour-scoring-images train images, with permutation p-values.
Writes bench/out/quality_car/ (CSV, PNG, JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from netcarve.reproduce.car import (
    CarSettings,
    car_vs_baselines,
    colour_markdown,
    colour_vs_shape,
    half_table_markdown,
)

OUT = Path(__file__).parent / "out" / "quality_car"


def main() -> None:
    """Parse the flags, run the chosen parts, write the files and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["fmnist", "colour", "all"], default="all")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--eval-images", type=int, default=5000)
    ap.add_argument("--finetune", type=int, default=0)
    ap.add_argument("--finetune-images", type=int, default=10000)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--colour-images", type=int, default=500)
    ap.add_argument("--colour-model", default=CarSettings().colour_model)
    ap.add_argument("--colour-scoring-images", type=int, default=2000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--mode", choices=["exact", "lazy"], default="exact")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = CarSettings(scoring_images=args.images, eval_images=args.eval_images,
                           greedy_mode=args.mode, finetune_epochs=args.finetune,
                           finetune_images=args.finetune_images, lr=args.lr,
                           colour_model=args.colour_model,
                           colour_scoring_images=args.colour_scoring_images,
                           colour_images=args.colour_images, colour_k=args.k)
    OUT.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"  {message}", flush=True)

    if args.part in ("fmnist", "all"):
        res = car_vs_baselines(settings, args.seed, log)
        res["curves"].save(OUT / "fmnist")
        (OUT / "fmnist.json").write_text(json.dumps(
            {"curves": res["curves"].to_dict(), "greedy": res["greedy"], "table": res["table"]},
            indent=2))
        for tuned in (False, True):
            if any(r["finetuned"] == tuned for r in res["table"]):
                title = "after fine-tuning" if tuned else "no fine-tuning"
                print(f"\n### fmnist_vgg, 50% of the filters pruned, {title} "
                      f"(top-1 on {res['n_eval']} test images)\n")
                print(half_table_markdown(res["table"], tuned))
    if args.part in ("colour", "all"):
        res = colour_vs_shape(settings, args.seed, log)
        res["reports"]["weight"].save(OUT / "colour_features.0.csv")
        (OUT / "colour.json").write_text(json.dumps(
            {k: v for k, v in res.items() if k != "reports"}, indent=2))
        print(f"\n### {res['model']} {res['layer']}: colour-selective among the first "
              f"{res['k']} pruned vs kept\n")
        print(colour_markdown(res))
        print(f"\ngreedy CAR: {res['greedy_seconds']:.0f} s on {res['n_scoring']} images "
              f"(scoring accuracy {res['scoring_accuracy']:.4f}; {res['zero_car_filters']} of "
              f"{res['filters']} filters have top-1 CAR 0, so the loss decides); correlation "
              f"of the loss CAR with the weight index {res['corr_weight_index_vs_loss_car']:.2f}"
              f", with the response index {res['corr_response_index_vs_loss_car']:.2f}")


if __name__ == "__main__":
    main()
