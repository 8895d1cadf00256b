"""CAR speed: the ablation engine vs the naive loop, and exact vs lazy greedy pruning.

Run: .venv/bin/python bench/bench_car.py [--part speed|greedy|all] [--threads 1]
         [--layers features.7,features.11] [--repeats 2]

(1) speed: CAR of every filter of a conv layer of fmnist_vgg (default: features.7, the middle
    one of its five convs) on 2,000 images (the first 2,000 of the train split), batch size
    100 for both: the engine (cached prefix, stacked removals, unchanged items skipped) against
    the naive loop (one full forward pass per removal and chunk, masks applied by hooks).
    Both runs are timed alternately (--repeats, best time kept); the statistics must be
    identical (torch.equal on every count and loss sum). One intra-op thread by default: on a
    shared machine, two threads made timings swing by up to 10x.
(2) greedy: exact vs lazy greedy pruning of half of that layer's filters on the first
    --greedy-images train images: time ratio, order agreement (Kendall tau), overlap.
Prints Markdown and writes bench/out/bench_car.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from netcarve.ablation import AblationEngine, ablate_naive, single_removals
from netcarve.car import greedy_prune, order_agreement
from netcarve.evaluation import reference_data
from netcarve.zoo import load_model

FIELDS = ["correct", "correct5", "loss_sum", "class_correct", "class_loss", "base_correct",
          "base_loss_sum"]


def speed(layers: list[str], n_images: int, batch_size: int, repeats: int) -> list[dict]:
    lm = load_model("fmnist_vgg")
    x, y = reference_data(lm.preset, "train", n_images)
    x = lm.preset.normalize(x)
    rows = []
    for layer in layers:
        c = lm.model.get_submodule(layer).out_channels
        cand = single_removals(c)
        best_e = best_n = cpu_e = cpu_n = float("inf")
        stats_e = stats_n = None
        for _ in range(repeats):
            engine = AblationEngine(lm.model, x, y, batch_size=batch_size, cache_mb=0)
            t, c0 = time.perf_counter(), time.process_time()
            stats_e = engine.evaluate(layer, cand)
            best_e = min(best_e, time.perf_counter() - t)
            cpu_e = min(cpu_e, time.process_time() - c0)
            t, c0 = time.perf_counter(), time.process_time()
            stats_n = ablate_naive(lm.model, layer, cand, x, y, batch_size=batch_size)
            best_n = min(best_n, time.perf_counter() - t)
            cpu_n = min(cpu_n, time.process_time() - c0)
            print(f"  {layer}: engine {best_e:.1f} s ({cpu_e:.1f} s CPU), naive {best_n:.1f} s "
                  f"({cpu_n:.1f} s CPU) (best so far)", flush=True)
        assert stats_e is not None and stats_n is not None
        identical = all(torch.equal(getattr(stats_e, f), getattr(stats_n, f)) for f in FIELDS)
        rows.append({"layer": layer, "filters": c, "images": n_images,
                     "batch_size": batch_size, "engine_s": best_e, "naive_s": best_n,
                     "speedup": best_n / best_e, "engine_cpu_s": cpu_e, "naive_cpu_s": cpu_n,
                     "cpu_speedup": cpu_n / cpu_e, "identical": identical,
                     "engine_passes": stats_e.counts.to_dict(),
                     "naive_passes": stats_n.counts.full_passes,
                     "base_accuracy": stats_e.base_metric("top1")})
        print("  " + json.dumps(rows[-1]), flush=True)
    return rows


def greedy(layer: str, n_images: int, batch_size: int) -> dict:
    lm = load_model("fmnist_vgg")
    x, y = reference_data(lm.preset, "train", n_images)
    x = lm.preset.normalize(x)
    half = lm.model.get_submodule(layer).out_channels // 2
    out = {}
    for name, mode, refresh in (("exact", "exact", None), ("lazy", "lazy", None),
                                ("lazy_refresh8", "lazy", 8)):
        engine = AblationEngine(lm.model, x, y, batch_size=batch_size)
        res = greedy_prune(lm.model, x, y, layer, amount=half, mode=mode, refresh=refresh,
                           engine=engine)
        out[name] = res
        print(f"  {name}: {res.seconds:.1f} s, {res.evaluations} candidate evaluations, "
              f"accuracy after {res.steps[-1].accuracy:.4f}", flush=True)
    agree = order_agreement(out["exact"].order, out["lazy"].order)
    refreshed = out["lazy_refresh8"]
    agree8 = order_agreement(out["exact"].order, refreshed.order)
    return {"layer": layer, "pruned": half, "images": n_images,
            "lazy_refresh8": {"seconds": refreshed.seconds,
                              "evaluations": refreshed.evaluations,
                              "accuracy": refreshed.steps[-1].accuracy, **agree8},
            "exact_s": out["exact"].seconds, "lazy_s": out["lazy"].seconds,
            "time_ratio": out["exact"].seconds / out["lazy"].seconds,
            "exact_evaluations": out["exact"].evaluations,
            "lazy_evaluations": out["lazy"].evaluations,
            "exact_accuracy": out["exact"].steps[-1].accuracy,
            "lazy_accuracy": out["lazy"].steps[-1].accuracy,
            "base_accuracy": out["exact"].base_accuracy, **agree,
            "exact_order": [f for _, f in out["exact"].order],
            "lazy_order": [f for _, f in out["lazy"].order]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["speed", "greedy", "all"], default="all")
    ap.add_argument("--layers", default="features.7")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--greedy-images", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = [s for s in args.layers.split(",") if s]
    result: dict = {"torch": torch.__version__, "threads": args.threads,
                    "machine": platform.processor() or platform.machine()}
    if args.part in ("speed", "all"):
        print(f"## CAR scores: engine vs naive loop ({args.images} images, batch "
              f"{args.batch_size})")
        result["speed"] = speed(layers, args.images, args.batch_size, args.repeats)
        print("| layer | filters | engine (s) | naive (s) | speed-up | CPU-time speed-up | "
              "identical | passes (prefix + suffix vs naive) | items skipped |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in result["speed"]:
            p = r["engine_passes"]
            print(f"| {r['layer']} | {r['filters']} | {r['engine_s']:.1f} | {r['naive_s']:.1f} "
                  f"| {r['speedup']:.1f}× | {r['cpu_speedup']:.1f}× | {r['identical']} | "
                  f"{p['prefix_passes']} + "
                  f"{p['suffix_passes']} vs {r['naive_passes']} | "
                  f"{p['skipped_items']:,} of {p['skipped_items'] + p['suffix_items']:,} |")
    if args.part in ("greedy", "all"):
        layer = layers[0]
        print(f"## Exact vs lazy greedy: half of {layer} ({args.greedy_images} images)")
        g = greedy(layer, args.greedy_images, args.batch_size)
        result["greedy"] = g
        print(f"exact {g['exact_s']:.1f} s ({g['exact_evaluations']} evaluations), lazy "
              f"{g['lazy_s']:.1f} s ({g['lazy_evaluations']}): {g['time_ratio']:.1f}× faster; "
              f"Kendall tau {g['kendall_tau']:.3f} (over the filters both pruned "
              f"{g['kendall_tau_common']:.3f}), overlap {g['overlap']:.3f}, same step "
              f"{g['same_step_fraction']:.2f}; accuracy after: exact {g['exact_accuracy']:.4f}, "
              f"lazy {g['lazy_accuracy']:.4f} (base {g['base_accuracy']:.4f})")
        r8 = g["lazy_refresh8"]
        print(f"lazy with a full re-scoring every 8 steps: {r8['seconds']:.1f} s "
              f"({r8['evaluations']} evaluations), Kendall tau {r8['kendall_tau']:.3f} "
              f"(common {r8['kendall_tau_common']:.3f}), overlap {r8['overlap']:.3f}, "
              f"accuracy after {r8['accuracy']:.4f}")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    name = "bench_car.json" if args.part == "all" else f"bench_car_{args.part}.json"
    (out / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
