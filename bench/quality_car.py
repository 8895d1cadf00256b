"""CAR quality: accuracy kept by CAR vs baselines on fmnist_vgg; colour vs shape on shapes_cnn.

Run: .venv/bin/python bench/quality_car.py [--part fmnist|colour|all] [--finetune 1]

fmnist: prune 50% of the filters of the first conv (features.0, 16 of 32) and, separately, of
    the second conv (features.4, 32 of 64) of the bundled fmnist_vgg, by exact greedy CAR
    (scored on the first --images train images) and by each baseline (random, L1, mean
    activation, APoZ, Taylor; data-driven ones scored on the same images). Every pruned
    network is evaluated on the first --eval-images test images with the same removal
    semantics (output 0 after the BatchNorm). With --finetune E, each method's physically
    pruned model at 50% is fine-tuned E epochs (same recipe and seed, --finetune-images train
    images per epoch) and evaluated again.
colour: colour-selectivity of the 48 first-layer filters of shapes_cnn (weight index; response
    index on --colour-images test images) and the colour-selective fraction among the 20
    first filters pruned by exact greedy CAR (and the one-shot CAR ranking, and L1) vs the kept
    ones, with the hypergeometric p-value.
Prints Markdown, writes bench/out/quality_car/ (CSV, PNG, JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from netcarve.baselines import (
    BASELINES,
    CurveReport,
    baseline_order,
    baseline_scores,
    compare_methods,
)
from netcarve.car import car_scores, greedy_prune
from netcarve.colour import colour_selectivity, colour_vs_pruning
from netcarve.evaluation import reference_data
from netcarve.zoo import load_model

OUT = Path(__file__).parent / "out" / "quality_car"


def fmnist(n_images: int, n_eval: int, finetune: int, ft_images: int, lr: float) -> dict:
    lm = load_model("fmnist_vgg")
    xs, ys = reference_data(lm.preset, "train", n_images)
    xe, ye = reference_data(lm.preset, "test", n_eval)
    report = CurveReport()
    greedy_info = {}
    for layer in ("features.0", "features.4"):
        n = lm.model.get_submodule(layer).out_channels
        half = n // 2
        t = time.perf_counter()
        g = greedy_prune(lm.model, xs, ys, layer, amount=half, preset=lm.preset)
        greedy_info[layer] = {"seconds": time.perf_counter() - t, "order": g.removed(layer),
                              "scoring_accuracy_after": g.steps[-1].accuracy,
                              "scoring_accuracy_before": g.base_accuracy}
        print(f"  greedy CAR on {layer}: {greedy_info[layer]['seconds']:.0f} s", flush=True)
        compare_methods(lm.model, layer, score_images=xs, score_labels=ys, eval_images=xe,
                        eval_labels=ye, counts=[0, half // 4, half // 2, 3 * half // 4, half],
                        car_order=g.removed(layer), preset=lm.preset,
                        finetune_epochs=finetune, finetune_at=[half] if finetune else [],
                        lr=lr, finetune_max_images=ft_images, report=report)
        print(f"  curves for {layer} done", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    report.save(OUT / "fmnist")
    return {"curves": report.to_dict(), "greedy": greedy_info, "n_images": n_images,
            "n_eval": n_eval, "finetune_epochs": finetune, "finetune_images": ft_images,
            "lr": lr}


def colour(n_images: int, n_colour: int, k: int) -> dict:
    lm = load_model("shapes_cnn")
    xs, ys = reference_data(lm.preset, "train", n_images)
    xc, _ = reference_data(lm.preset, "test", n_colour)
    rep_w = colour_selectivity(lm.model, "features.0", preset=lm.preset, images=xc, by="weight")
    rep_r = colour_selectivity(lm.model, "features.0", preset=lm.preset, images=xc,
                               by="response")
    t = time.perf_counter()
    g = greedy_prune(lm.model, xs, ys, "features.0", amount=k, preset=lm.preset)
    greedy_s = time.perf_counter() - t
    one = car_scores(lm.model, xs, ys, "features.0", preset=lm.preset).layers["features.0"]
    l1 = baseline_order(baseline_scores(lm.model, "features.0", "l1"))
    orders = {"greedy CAR": g.removed("features.0"), "one-shot CAR": one.ranking(), "L1": l1}
    rows = []
    for name, order in orders.items():
        for rep in (rep_w, rep_r):
            rows.append({"order": name, **colour_vs_pruning(rep, order, k)})
    corr = torch.corrcoef(torch.stack([rep_w.weight_index, rep_r.index, one.car,
                                       one.loss_car]))
    OUT.mkdir(parents=True, exist_ok=True)
    rep_w.save(OUT / "colour_features.0.csv")
    return {"rows": rows, "greedy_seconds": greedy_s, "n_images": n_images,
            "n_colour_images": n_colour, "k": k, "orders": orders,
            "scoring_accuracy": g.base_accuracy,
            "zero_car_filters_one_shot": int((one.car == 0).sum()),
            "corr_weight_index_vs_loss_car": float(corr[0, 3]),
            "corr_response_index_vs_loss_car": float(corr[1, 3]),
            "weight_index": rep_w.to_dict()["weight_index"],
            "response_index": rep_r.to_dict()["response_index"]}


def print_fmnist(res: dict) -> None:
    rows = res["curves"]["points"]
    for tuned in (False, True):
        pts = [r for r in rows if r["finetuned"] == tuned]
        if not pts:
            continue
        title = "after fine-tuning" if tuned else "no fine-tuning"
        print(f"\n### fmnist_vgg, 50% of the filters pruned, {title} "
              f"(top-1 on {res['n_eval']} test images)")
        print("| layer | pruned | unpruned | car | " + " | ".join(BASELINES) + " |")
        print("|---|---|---|---|" + "---|" * len(BASELINES))
        for layer in ("features.0", "features.4"):
            half = max(r["pruned"] for r in rows if r["layer"] == layer)
            base = next(r["accuracy"] for r in rows if r["layer"] == layer
                        and r["pruned"] == 0 and not r["finetuned"])
            acc = {r["method"]: r["accuracy"] for r in pts if r["layer"] == layer
                   and r["pruned"] == half}
            cells = " | ".join(f"{acc[m]:.4f}" for m in ("car", *BASELINES))
            print(f"| {layer} | {half} | {base:.4f} | {cells} |")


def print_colour(res: dict) -> None:
    print(f"\n### shapes_cnn features.0: colour-selective among the first {res['k']} pruned "
          "vs kept")
    print("| order | index (threshold) | colour among first pruned | colour among kept | "
          "all | p (≥ by chance) | mean index first pruned / kept |")
    print("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['order']} | {r['by']} (> {r['threshold']}) | {r['pruned_colour']}/{r['k']}"
              f" = {r['pruned_fraction']:.2f} | {r['kept_colour']}/{r['kept']} = "
              f"{r['kept_fraction']:.2f} | {r['all_fraction']:.2f} | {r['p_value']:.3f} | "
              f"{r['pruned_mean_index']:.3f} / {r['kept_mean_index']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["fmnist", "colour", "all"], default="all")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--eval-images", type=int, default=5000)
    ap.add_argument("--finetune", type=int, default=0)
    ap.add_argument("--finetune-images", type=int, default=10000)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--colour-images", type=int, default=500)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.part in ("fmnist", "all"):
        res = fmnist(args.images, args.eval_images, args.finetune, args.finetune_images,
                     args.lr)
        (OUT / "fmnist.json").write_text(json.dumps(res, indent=2))
        print_fmnist(res)
    if args.part in ("colour", "all"):
        res = colour(args.images, args.colour_images, args.k)
        (OUT / "colour.json").write_text(json.dumps(res, indent=2))
        print_colour(res)
        print(f"\ngreedy CAR: {res['greedy_seconds']:.0f} s on {res['n_images']} images "
              f"(scoring accuracy {res['scoring_accuracy']:.4f}; "
              f"{res['zero_car_filters_one_shot']} of 48 filters have top-1 CAR 0, so the loss "
              f"decides); correlation of the loss CAR with the weight index "
              f"{res['corr_weight_index_vs_loss_car']:.2f}, with the response index "
              f"{res['corr_response_index_vs_loss_car']:.2f}")


if __name__ == "__main__":
    main()
