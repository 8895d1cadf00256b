"""Circuit quality: median held-out preservation per criterion and keep, laid out like the
reference table of the circuits paper, on fmnist_vgg and fmnist_resnet.

Run: .venv/bin/python bench/quality_circuits.py [--units-per-layer 8] [--images 300]
Units: random channels (seed 0) from every conv layer except the first (whose kernels see
the image directly). Scoring images come from the train split, held-out images from the test
split. Writes CSV and PNG per model under out/bench/ and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from netcarve.circuits.sweep import pick_units, sweep
from netcarve.core.graph import ModelGraph
from netcarve.training.evaluation import analysis_data
from netcarve.zoo import load_model

CRITERIA = ("actgrad", "snip", "force", "magnitude", "random")
KEEPS = (0.5, 0.2, 0.1, 0.05, 0.01)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units-per-layer", type=int, default=8)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--models", default="fmnist_vgg,fmnist_resnet")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path("out/bench")
    for name in args.models.split(","):
        start = time.perf_counter()
        lm = load_model(name)
        scoring, heldout = analysis_data(lm.preset, args.images, args.images, seed=0)
        graph = ModelGraph.build(lm.model, scoring[:1])
        convs = [n for n, i in graph.layers.items() if i.kind == "conv"][1:]
        units = pick_units(graph, convs, args.units_per_layer, seed=0)
        res = sweep(lm.model, units, scoring, heldout, criteria=CRITERIA, keeps=KEEPS,
                    graph=graph, progress=True)
        res.write_csv(out / f"{name}_sweep.csv")
        res.plot(out / f"{name}_sweep.png", title=f"{name}: held-out preservation vs keep")
        collapse = res.collapse_fraction()
        print(f"\n### {name}: {len(units)} units from {len(convs)} conv layers "
              f"({', '.join(convs)}), {args.images} scoring + {args.images} held-out images, "
              f"{time.perf_counter() - start:.0f} s\n")
        print("Median held-out Pearson r (collapsed circuits count as 0):\n")
        print(res.markdown_table())
        print("\nTotal-collapse fraction:\n")
        print("| keep | " + " | ".join(CRITERIA) + " |")
        print("|---|" + "---|" * len(CRITERIA))
        for k in KEEPS:
            print(f"| {k:g} | " + " | ".join(f"{collapse[c][k]:.2f}" for c in CRITERIA) + " |")


if __name__ == "__main__":
    main()
