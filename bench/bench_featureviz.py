"""Speed of feature visualisation and of class-preference vectors on fmnist_vgg (CPU).

Run: .venv/bin/python bench/bench_featureviz.py [--threads 2] [--layer features.7]
     [--steps 256] [--cp-layer features.4] [--cp-images 128]

Prints a Markdown section for bench/RESULTS.md:

1. all channels of one layer visualised in one batched run (one channel per batch item),
   against the same channels visualised one at a time (batch size 1, same seeds, so the same
   images up to float rounding); and the quality check of that batched run (share of channels
   whose own image activates them more than the other channels' images do on average);
2. class-preference vectors of a whole layer: the batched method (one backward per class per
   batch, for every filter) against a loop over filters (one backward per class per batch per
   filter), with the largest difference between the two.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layer", default="features.7")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--cp-layer", default="features.4")
    parser.add_argument("--cp-images", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from netcarve.function.descriptors import _class_preference_loop, class_preference
    from netcarve.training.evaluation import analysis_data
    from netcarve.viz.render import build_graph, layer_activations, visualize
    from netcarve.zoo import load_model

    lm = load_model("fmnist_vgg")
    graph = build_graph(lm.model, (1, 28, 28))
    n = graph.layer(args.layer).out_channels
    load = os.getloadavg()[0]
    threads = f"{args.threads} thread" + ("s" if args.threads != 1 else "")
    print(f"## Feature visualisation (fmnist_vgg, CPU, {threads}, "
          f"load average {load:.1f} at start)\n")

    visualize(lm.model, args.layer, channels=[0], preset=lm.preset, steps=2, graph=graph)  # warm
    start = time.perf_counter()
    batched = visualize(lm.model, args.layer, preset=lm.preset, steps=args.steps,
                        batch_size=n, graph=graph)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    single = visualize(lm.model, args.layer, preset=lm.preset, steps=args.steps,
                       batch_size=1, graph=graph)
    t_single = time.perf_counter() - start
    acts = layer_activations(lm.model, args.layer, batched.inputs)
    own = acts.diagonal()
    others = (acts.sum(dim=0) - own) / (len(acts) - 1)
    wins = float((own > others).float().mean())
    diff = float((batched.images - single.images).abs().max())
    print(f"| what | {args.layer}, {n} channels, {args.steps} steps |")
    print("|---|---|")
    print(f"| one batched run ({n} items) | {t_batched:.1f} s |")
    print(f"| one channel at a time | {t_single:.1f} s |")
    print(f"| speed-up | {t_single / t_batched:.1f}× |")
    print(f"| largest pixel difference batched vs one at a time | {diff:.2g} |")
    print(f"| channels whose own image wins (quality bar ≥ 90%) | {wins:.1%} |")
    print()

    x, _ = analysis_data(lm.preset, args.cp_images, 1, seed=0)
    m = graph.layer(args.cp_layer).out_channels
    class_preference(lm.model, args.cp_layer, x[:8])  # warm
    start = time.perf_counter()
    fast = class_preference(lm.model, args.cp_layer, x, batch_size=128)
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    slow = _class_preference_loop(lm.model, args.cp_layer, x, batch_size=128)
    t_slow = time.perf_counter() - start
    err = float((fast - slow).abs().max() / fast.abs().max())
    print(f"## Class-preference vectors ({args.cp_layer}, {m} filters × 10 classes, "
          f"{args.cp_images} images)\n")
    print("| method | seconds |")
    print("|---|---|")
    print(f"| batched: one backward per class per batch, all filters | {t_fast:.2f} |")
    print(f"| loop over filters: one backward per class per batch per filter | {t_slow:.1f} |")
    print(f"| speed-up | {t_slow / t_fast:.0f}× |")
    print(f"| largest relative difference | {err:.1e} |")


if __name__ == "__main__":
    main()
